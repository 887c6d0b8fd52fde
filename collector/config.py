"""Collector settings: every one has a flag, a ``GRADWATCH_*`` variable and a default."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from gradwatch.collector.ingest import Limits

DEFAULT_GRPC_ADDRESS = "127.0.0.1:8470"
DEFAULT_METRICS_ADDRESS = "127.0.0.1:8471"


@dataclass
class CollectorConfig:
    grpc_address: str = DEFAULT_GRPC_ADDRESS
    metrics_address: str = DEFAULT_METRICS_ADDRESS
    webhook_urls: list[str] = field(default_factory=list)
    max_variable_series: int = 500  # per training job x optimizer
    limits: Limits = field(default_factory=Limits)
    #: If set, the bound addresses are written here as JSON once serving (for tests,
    #: scripts and port 0).
    ready_file: str | None = None


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def address(value: str) -> str:
    split_host_port(value)
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--grpc-address", type=address,
                        default=env("GRADWATCH_GRPC_ADDRESS", DEFAULT_GRPC_ADDRESS),
                        help="HOST:PORT for agents (env GRADWATCH_GRPC_ADDRESS; port 0 picks "
                             "a free port); default %(default)s")
    parser.add_argument("--metrics-address", type=address,
                        default=env("GRADWATCH_METRICS_ADDRESS", DEFAULT_METRICS_ADDRESS),
                        help="HOST:PORT serving /metrics and /healthz (env "
                             "GRADWATCH_METRICS_ADDRESS); default %(default)s")
    parser.add_argument("--webhook-url", action="append", dest="webhook_urls",
                        default=[u for u in env("GRADWATCH_WEBHOOK_URLS", "").split(",") if u],
                        help="POST alerts (Alertmanager JSON shape) here; repeatable (env "
                             "GRADWATCH_WEBHOOK_URLS, comma-separated)")
    parser.add_argument("--max-variable-series", type=int,
                        default=int(env("GRADWATCH_MAX_VARIABLE_SERIES", "500")),
                        help="per-variable series per job and optimizer before folding into "
                             "variable=\"__other__\" (env GRADWATCH_MAX_VARIABLE_SERIES); "
                             "default %(default)s")
    parser.add_argument("--ready-file", default=env("GRADWATCH_READY_FILE"),
                        help="write the bound addresses here as JSON once serving")


def from_arguments(args: argparse.Namespace) -> CollectorConfig:
    return CollectorConfig(
        grpc_address=args.grpc_address,
        metrics_address=args.metrics_address,
        webhook_urls=list(args.webhook_urls),
        max_variable_series=args.max_variable_series,
        ready_file=args.ready_file,
    )


