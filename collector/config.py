"""Collector settings: flags, ``GRADWATCH_*`` variables, a YAML file, and defaults.

Precedence for each setting: flag, environment variable, ``--config`` file,
built-in default. URL lists are the union of all sources. Invalid settings
stop the collector at start with `ConfigError` naming the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gradwatch.collector import web_config
from gradwatch.collector.auth import TokensFileError, load_tokens
from gradwatch.collector.ingest import Limits
from gradwatch.collector.rules import RULES, RuleSettings
from gradwatch.collector.tls import ServerCertificates

DEFAULT_GRPC_ADDRESS = "127.0.0.1:8470"
DEFAULT_METRICS_ADDRESS = "127.0.0.1:8471"


class ConfigError(ValueError):
    """A setting is invalid; the message names it."""


@dataclass
class CollectorConfig:
    grpc_address: str = DEFAULT_GRPC_ADDRESS
    metrics_address: str = DEFAULT_METRICS_ADDRESS
    webhook_urls: list[str] = field(default_factory=list)
    alertmanager_urls: list[str] = field(default_factory=list)
    max_variable_series: int = 500  # per training job x optimizer
    #: Condition gone this long before an alert resolves (hysteresis).
    resolve_after_s: float = 10.0
    #: Firing alerts are re-sent to Alertmanager this often, with endsAt 4x ahead.
    resend_interval_s: float = 30.0
    #: Timer-driven rule pass (WorkerSilent, pending resolutions).
    evaluation_interval_s: float = 1.0
    #: A job's rules run after a batch at most this often; batches arriving sooner are
    #: evaluated together by a timer (bounds rule cost per job, not per task).
    batch_evaluation_interval_s: float = 0.05
    #: Where alerts' runbook_url annotations point (each alert appends #its-name).
    runbook_url: str = "docs/runbook.md"
    #: A finished (closed) session's state, series and alerts are kept this long.
    closed_retention_s: float = 3600.0
    #: SIGTERM: streams drained, last rules run and sinks flushed within this long.
    shutdown_grace_s: float = 5.0
    #: Each agent connection is pinged this often; one that does not answer within the
    #: timeout (its host vanished without closing it) is closed, ending its streams.
    grpc_keepalive_s: float = 30.0
    grpc_keepalive_timeout_s: float = 10.0
    rules: RuleSettings = field(default_factory=RuleSettings)
    limits: Limits = field(default_factory=Limits)
    #: If set, the bound addresses are written here as JSON once serving (for tests,
    #: scripts and port 0).
    ready_file: str | None = None
    #: Prometheus web-config file (TLS, client certificates, basic auth) for /metrics and
    #: /healthz; None serves plain HTTP to anyone (see docs/operations.md).
    web_config_file: str | None = None
    #: TLS on the gRPC port (agents): certificate and key files; with a client CA file,
    #: agents must present a certificate it signed (mutual TLS). Reloaded on change.
    grpc_tls_cert_file: str | None = None
    grpc_tls_key_file: str | None = None
    grpc_tls_client_ca_file: str | None = None
    #: Bearer tokens scoped to training jobs (see gradwatch.collector.auth); None lets
    #: any agent report any job.
    tokens_file: str | None = None


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def address(value: str) -> str:
    split_host_port(value)
    return value


# -- YAML ----------------------------------------------------------------------------------

_SCALARS = {  # file key -> (CollectorConfig field, type)
    "grpc_address": ("grpc_address", str),
    "metrics_address": ("metrics_address", str),
    "max_variable_series": ("max_variable_series", int),
    "resolve_after_seconds": ("resolve_after_s", float),
    "resend_interval_seconds": ("resend_interval_s", float),
    "evaluation_interval_seconds": ("evaluation_interval_s", float),
    "batch_evaluation_interval_seconds": ("batch_evaluation_interval_s", float),
    "closed_retention_seconds": ("closed_retention_s", float),
    "shutdown_grace_seconds": ("shutdown_grace_s", float),
    "grpc_keepalive_seconds": ("grpc_keepalive_s", float),
    "grpc_keepalive_timeout_seconds": ("grpc_keepalive_timeout_s", float),
    "runbook_url": ("runbook_url", str),
    "web_config_file": ("web_config_file", str),
    "grpc_tls_cert_file": ("grpc_tls_cert_file", str),
    "grpc_tls_key_file": ("grpc_tls_key_file", str),
    "grpc_tls_client_ca_file": ("grpc_tls_client_ca_file", str),
    "tokens_file": ("tokens_file", str),
}
_FILES = ("web_config_file", "grpc_tls_cert_file", "grpc_tls_key_file",
          "grpc_tls_client_ca_file", "tokens_file")
_LISTS = {"webhook_urls": "webhook_urls", "alertmanager_urls": "alertmanager_urls"}


def _check_type(path: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"{path}: expected {kind.__name__}, got {value!r}")
    if kind in (int, float) and value < 0:
        raise ConfigError(f"{path}: must not be negative, got {value!r}")
    return value


def _rule_params(path: str, data: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of alert names, got {data!r}")
    params = dict(defaults)
    by_name = {rule.name: rule for rule in RULES}
    for name, values in data.items():
        if name not in by_name:
            raise ConfigError(f"{path}.{name}: unknown alert; known: {', '.join(by_name)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}.{name}: expected a mapping, got {values!r}")
        fields = {f.name: f for f in dataclasses.fields(params[name])}
        checked = {}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(f"{path}.{name}.{key}: unknown setting; known: "
                                  f"{', '.join(fields)}")
            kind = type(getattr(params[name], key))
            checked[key] = _check_type(f"{path}.{name}.{key}", value, kind)
        params[name] = dataclasses.replace(params[name], **checked)
    return params


def _limits(data: Any, defaults: Limits) -> Limits:
    """The ``limits:`` mapping: `Limits` field names, positive integers."""
    if not isinstance(data, dict):
        raise ConfigError(f"limits: expected a mapping, got {data!r}")
    names = [f.name for f in dataclasses.fields(Limits)]
    checked = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"limits.{key}: unknown limit; known: {', '.join(names)}")
        checked[key] = _check_type(f"limits.{key}", value, int)
        if not checked[key]:
            raise ConfigError(f"limits.{key}: must be at least 1")
    return dataclasses.replace(defaults, **checked)


def load_file(path: str, config: CollectorConfig) -> CollectorConfig:
    """Applies a YAML file (see deploy/collector.example.yaml) to ``config``."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    known = {*_SCALARS, *_LISTS, "rules", "jobs", "limits"}
    for key in data:
        if key not in known:
            raise ConfigError(f"{key}: unknown setting; known: {', '.join(sorted(known))}")
    for key, (attr, kind) in _SCALARS.items():
        if key in data:
            setattr(config, attr, _check_type(key, data[key], kind))
    for key in ("grpc_keepalive_seconds", "grpc_keepalive_timeout_seconds"):
        if data.get(key) == 0:
            raise ConfigError(f"{key}: must be positive")
    for key in _FILES:  # relative to this file's folder, as in Prometheus
        if key in data:
            setattr(config, key, str(Path(path).parent / getattr(config, key)))
    for key, attr in _LISTS.items():
        urls = data.get(key, [])
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise ConfigError(f"{key}: expected a list of URLs")
        getattr(config, attr).extend(urls)
    config.limits = _limits(data.get("limits", {}), config.limits)
    base = _rule_params("rules", data.get("rules", {}), config.rules.base)
    jobs = data.get("jobs", {})
    if not isinstance(jobs, dict):
        raise ConfigError("jobs: expected a mapping of training_job patterns")
    config.rules = RuleSettings(base=base, jobs=tuple(
        (str(pattern), _rule_params(f"jobs.{pattern}", rules, base))
        for pattern, rules in jobs.items()))
    return config


# -- command line --------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=os.environ.get("GRADWATCH_CONFIG"),
                        help="YAML file with rules, thresholds, per-job overrides and sinks "
                             "(env GRADWATCH_CONFIG)")
    parser.add_argument("--grpc-address", type=address,
                        help=f"HOST:PORT for agents (env GRADWATCH_GRPC_ADDRESS; port 0 picks "
                             f"a free port); default {DEFAULT_GRPC_ADDRESS}")
    parser.add_argument("--metrics-address", type=address,
                        help="HOST:PORT serving /metrics and /healthz (env "
                             f"GRADWATCH_METRICS_ADDRESS); default {DEFAULT_METRICS_ADDRESS}")
    parser.add_argument("--alertmanager-url", action="append", dest="alertmanager_urls",
                        default=[], metavar="URL",
                        help="Alertmanager base URL, e.g. http://alertmanager:9093; repeatable "
                             "(env GRADWATCH_ALERTMANAGER_URLS, comma-separated)")
    parser.add_argument("--webhook-url", action="append", dest="webhook_urls", default=[],
                        metavar="URL",
                        help="POST alerts (Alertmanager JSON shape) here; repeatable (env "
                             "GRADWATCH_WEBHOOK_URLS, comma-separated)")
    parser.add_argument("--max-variable-series", type=int,
                        help="per-variable series per job and optimizer before folding into "
                             "variable=\"__other__\" (env GRADWATCH_MAX_VARIABLE_SERIES); "
                             "default 500")
    parser.add_argument("--resolve-after", type=float, dest="resolve_after_s", metavar="SECONDS",
                        help="an alert resolves after its condition stayed away this long "
                             "(env GRADWATCH_RESOLVE_AFTER); default 10")
    parser.add_argument("--web-config-file", metavar="FILE",
                        help="Prometheus web-config file: TLS, client certificates and basic "
                             "auth for /metrics and /healthz (env GRADWATCH_WEB_CONFIG_FILE); "
                             "default: plain HTTP, no authentication")
    parser.add_argument("--grpc-tls-cert-file", metavar="FILE",
                        help="serve gRPC over TLS with this certificate (PEM; env "
                             "GRADWATCH_GRPC_TLS_CERT_FILE); needs --grpc-tls-key-file")
    parser.add_argument("--grpc-tls-key-file", metavar="FILE",
                        help="the certificate's private key (env GRADWATCH_GRPC_TLS_KEY_FILE)")
    parser.add_argument("--grpc-tls-client-ca-file", metavar="FILE",
                        help="require agents to present a certificate signed by this CA "
                             "(mutual TLS; env GRADWATCH_GRPC_TLS_CLIENT_CA_FILE)")
    parser.add_argument("--tokens-file", metavar="FILE",
                        help="bearer tokens scoped to training jobs, re-read when it changes "
                             "(env GRADWATCH_TOKENS_FILE); default: no authentication")
    parser.add_argument("--ready-file", default=os.environ.get("GRADWATCH_READY_FILE"),
                        help="write the bound addresses here as JSON once serving")


def _env_list(name: str) -> list[str]:
    return [u for u in os.environ.get(name, "").split(",") if u]


def from_arguments(args: argparse.Namespace) -> CollectorConfig:
    """Builds the config; raises ConfigError on any invalid setting."""
    config = CollectorConfig()
    if args.config:
        load_file(args.config, config)
    env = os.environ.get
    overrides = (
        ("grpc_address", args.grpc_address, env("GRADWATCH_GRPC_ADDRESS"), str),
        ("metrics_address", args.metrics_address, env("GRADWATCH_METRICS_ADDRESS"), str),
        ("max_variable_series", args.max_variable_series,
         env("GRADWATCH_MAX_VARIABLE_SERIES"), int),
        ("resolve_after_s", args.resolve_after_s, env("GRADWATCH_RESOLVE_AFTER"), float),
        ("web_config_file", args.web_config_file, env("GRADWATCH_WEB_CONFIG_FILE"), str),
        ("grpc_tls_cert_file", args.grpc_tls_cert_file, env("GRADWATCH_GRPC_TLS_CERT_FILE"),
         str),
        ("grpc_tls_key_file", args.grpc_tls_key_file, env("GRADWATCH_GRPC_TLS_KEY_FILE"), str),
        ("grpc_tls_client_ca_file", args.grpc_tls_client_ca_file,
         env("GRADWATCH_GRPC_TLS_CLIENT_CA_FILE"), str),
        ("tokens_file", args.tokens_file, env("GRADWATCH_TOKENS_FILE"), str),
    )
    for attr, flag, environment, kind in overrides:
        value = flag if flag is not None else environment
        if value is not None:
            try:
                setattr(config, attr, kind(value))
            except ValueError as error:
                raise ConfigError(f"{attr}: {error}") from error
    for attr in ("grpc_address", "metrics_address"):
        try:
            split_host_port(getattr(config, attr))
        except argparse.ArgumentTypeError as error:
            raise ConfigError(f"{attr}: {error}") from error
    config.webhook_urls += args.webhook_urls + _env_list("GRADWATCH_WEBHOOK_URLS")
    config.alertmanager_urls += args.alertmanager_urls + _env_list("GRADWATCH_ALERTMANAGER_URLS")
    for url in config.webhook_urls + config.alertmanager_urls:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"{url!r}: sink URLs must start with http:// or https://")
    if config.web_config_file:
        try:
            web_config.load(config.web_config_file)
        except web_config.WebConfigError as error:
            raise ConfigError(f"web_config_file: {config.web_config_file}: {error}") from error
    _check_grpc_security(config)
    config.ready_file = args.ready_file
    return config


def _check_grpc_security(config: CollectorConfig) -> None:
    """Loads the TLS and tokens files once, so a bad one stops the collector at start."""
    if bool(config.grpc_tls_cert_file) != bool(config.grpc_tls_key_file):
        raise ConfigError("grpc_tls_cert_file and grpc_tls_key_file go together")
    if config.grpc_tls_client_ca_file and not config.grpc_tls_cert_file:
        raise ConfigError("grpc_tls_client_ca_file: mutual TLS needs grpc_tls_cert_file and "
                          "grpc_tls_key_file")
    if config.grpc_tls_cert_file:
        try:
            ServerCertificates(config.grpc_tls_cert_file, config.grpc_tls_key_file,
                               config.grpc_tls_client_ca_file)
        except OSError as error:
            raise ConfigError(f"grpc_tls: {error}") from error
    if config.tokens_file:
        try:
            load_tokens(config.tokens_file)
        except TokensFileError as error:
            raise ConfigError(f"tokens_file: {error}") from error
