"""The collector's settings, each declared once (`gradwatch.collector.settings`).

Sources, later winning: defaults, the YAML file (``--config``), ``GRADWATCH_*``
variables, flags; URL lists are combined. Alert rules and per-job overrides are
YAML only (``rules:``, ``jobs:``). `load` checks everything, then the files the
settings name (TLS, tokens, web config), and raises `ConfigError` listing every
problem, each naming the setting and where its value came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gradwatch.collector import web_config
from gradwatch.collector.auth import TokensFileError, load_tokens
from gradwatch.collector.ingest import Limits
from gradwatch.collector.rules import RULES, RuleSettings
from gradwatch.collector.settings import (
    SettingsErrors,
    Sources,
    add_flags,
    address,
    declared,
    number,
    section,
    setting,
    split_host_port,
    text,
    url,
)
from gradwatch.collector.tls import ServerCertificates

__all__ = ["CollectorConfig", "ConfigError", "add_arguments", "load", "split_host_port"]

_SECONDS = number(float, 0, above=True)


@dataclass
class CollectorConfig:
    grpc_address: str = setting(
        "127.0.0.1:8470", "HOST:PORT for agents (port 0 picks a free port)", address,
        metavar="HOST:PORT")
    metrics_address: str = setting(
        "127.0.0.1:8471", "HOST:PORT serving /metrics and /healthz", address,
        metavar="HOST:PORT")
    alertmanager_urls: list[str] = setting(
        [], "Alertmanager base URL, e.g. http://alertmanager:9093; repeatable", url,
        flag="--alertmanager-url", metavar="URL", repeatable=True)
    webhook_urls: list[str] = setting(
        [], "POST alerts (Alertmanager JSON shape) here; repeatable", url,
        flag="--webhook-url", metavar="URL", repeatable=True)
    max_variable_series: int = setting(
        500, "per-variable series per job and optimizer before the rest fold into "
             'variable="__other__"', number(int, 0))
    resolve_after_seconds: float = setting(
        10.0, "an alert resolves after its condition stayed away this long (hysteresis)",
        number(float, 0), flag="--resolve-after", env="GRADWATCH_RESOLVE_AFTER",
        metavar="SECONDS")
    resend_interval_seconds: float = setting(
        30.0, "firing alerts are re-sent to Alertmanager this often, leased 4x ahead; "
        "changed annotations reach sinks at most this often",
        _SECONDS, metavar="SECONDS")
    evaluation_interval_seconds: float = setting(
        1.0, "timer-driven rule pass (WorkerSilent, pending resolutions)", _SECONDS,
        metavar="SECONDS")
    batch_evaluation_interval_seconds: float = setting(
        0.05, "a job's rules run after a batch at most this often; batches arriving sooner "
              "are evaluated together", _SECONDS, metavar="SECONDS")
    runbook_url: str = setting(
        "docs/runbook.md", "where alerts' runbook_url annotations point (each alert appends "
                           "#its-name in lower case, its heading's anchor)", text, metavar="URL")
    dashboard_base_url: str | None = setting(
        None, "Grafana's root URL, e.g. https://grafana.example.com: alerts then carry a "
              "dashboard_url annotation opening the job dashboard on the panel that answers "
              "them; none: no such annotation", url, metavar="URL")
    closed_retention_seconds: float = setting(
        3600.0, "a finished session's state, series and alerts are kept this long",
        number(float, 0), metavar="SECONDS")
    shutdown_grace_seconds: float = setting(
        5.0, "on SIGTERM, streams are drained, the last rules run and sinks flushed within "
             "this long", number(float, 0), metavar="SECONDS")
    grpc_keepalive_seconds: float = setting(
        30.0, "each agent connection is pinged this often", _SECONDS, metavar="SECONDS")
    grpc_keepalive_timeout_seconds: float = setting(
        10.0, "a connection that does not answer a ping this long is closed (its host "
              "vanished)", _SECONDS, metavar="SECONDS")
    web_config_file: str | None = setting(
        None, "Prometheus web-config file: TLS, client certificates and basic auth for "
              "/metrics and /healthz; none serves plain HTTP to anyone", text, path=True,
        metavar="FILE")
    grpc_tls_cert_file: str | None = setting(
        None, "serve gRPC over TLS with this certificate (PEM); needs --grpc-tls-key-file",
        text, path=True, metavar="FILE")
    grpc_tls_key_file: str | None = setting(
        None, "the certificate's private key", text, path=True, metavar="FILE")
    grpc_tls_client_ca_file: str | None = setting(
        None, "require agents to present a certificate signed by this CA (mutual TLS)", text,
        path=True, metavar="FILE")
    tokens_file: str | None = setting(
        None, "bearer tokens scoped to training jobs, re-read when it changes; none lets any "
              "agent report any job", text, path=True, metavar="FILE")
    ready_file: str | None = setting(
        None, "write the bound addresses here as JSON once serving (scripts, port 0)", text,
        metavar="FILE")
    limits: Limits = section(Limits)
    rules: RuleSettings = dataclasses.field(default_factory=RuleSettings)


class ConfigError(ValueError):
    """Invalid settings; ``errors`` has one line each, naming the setting and its source."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def environment_variables() -> frozenset[str]:
    """Every ``GRADWATCH_*`` variable the collector reads."""
    return frozenset(d.env for d in declared(CollectorConfig)) | {"GRADWATCH_CONFIG"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=os.environ.get("GRADWATCH_CONFIG"), metavar="FILE",
                        help="YAML file with settings, rules, per-job overrides and limits "
                             "(env GRADWATCH_CONFIG; deploy/collector.example.yaml)")
    add_flags(parser, CollectorConfig)


def load(args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None,
         config_file: str | None = None) -> CollectorConfig:
    """The settings from ``config_file`` (default ``args.config``), ``environ`` (default
    ``os.environ``) and ``args``; raises `ConfigError` listing every problem."""
    environ = os.environ if environ is None else environ
    config_file = config_file or getattr(args, "config", None)
    sources = Sources(CollectorConfig)
    errors: list[str] = []
    data: dict[str, Any] = {}
    if config_file:
        data = _read_yaml(config_file, errors)
        sources.add_mapping(data, config_file, Path(config_file).parent,
                            ignore=("rules", "jobs"))
    sources.add_environment(environ)
    if args is not None:
        sources.add_flags(args)
    try:
        config = sources.build()
    except SettingsErrors as error:
        errors += error.errors
        config = CollectorConfig()
    config.rules = _rule_settings(data, config_file or "", errors)
    errors += _check_files(config, sources)
    if errors:
        raise ConfigError(errors)
    return config


def _read_yaml(path: str, errors: list[str]) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        errors.append(f"{path}: {error}")
        return {}
    if not isinstance(data, dict):
        errors.append(f"{path}: expected a mapping at the top level")
        return {}
    return data


# -- rules --------------------------------------------------------------------------------

def _check_value(path: str, value: Any, default: Any, source: str,
                 above: float | None = None) -> Any:
    """A rule parameter of the default's type (an int is fine for a float), not negative,
    and greater than ``above`` where the parameter says (`rules.base.above`)."""
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ValueError(f"{path}: expected {kind.__name__}, got {value!r} (from {source})")
    if kind in (int, float) and not value >= 0:  # NaN too
        raise ValueError(f"{path}: must not be negative, got {value!r} (from {source})")
    if above is not None and not value > above:
        raise ValueError(f"{path}: must be greater than {above:g}, got {value!r} "
                         f"(from {source})")
    return value


def _rule_params(path: str, data: Any, defaults: dict[str, Any], source: str,
                 errors: list[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        errors.append(f"{path}: expected a mapping of alert names, got {data!r} (from {source})")
        return dict(defaults)
    params = dict(defaults)
    by_name = {rule.name: rule for rule in RULES}
    for name, values in data.items():
        if name not in by_name:
            errors.append(f"{path}.{name}: unknown alert (from {source}); known: "
                          f"{', '.join(by_name)}")
            continue
        if not isinstance(values, dict):
            errors.append(f"{path}.{name}: expected a mapping, got {values!r} (from {source})")
            continue
        fields = {f.name: f for f in dataclasses.fields(params[name])}
        checked = {}
        for key, value in values.items():
            if key not in fields:
                errors.append(f"{path}.{name}.{key}: unknown setting (from {source}); known: "
                              f"{', '.join(sorted(fields))}")
                continue
            try:
                checked[key] = _check_value(f"{path}.{name}.{key}", value,
                                            getattr(params[name], key), source,
                                            fields[key].metadata.get("above"))
            except ValueError as error:
                errors.append(str(error))
        params[name] = dataclasses.replace(params[name], **checked)
    return params


def _rule_settings(data: Mapping[str, Any], source: str, errors: list[str]) -> RuleSettings:
    base = _rule_params("rules", data.get("rules", {}), RuleSettings().base, source, errors)
    jobs = data.get("jobs", {})
    if not isinstance(jobs, dict):
        errors.append(f"jobs: expected a mapping of training_job patterns (from {source})")
        jobs = {}
    return RuleSettings(base=base, jobs=tuple(
        (str(pattern), _rule_params(f"jobs.{pattern}", rules, base, source, errors))
        for pattern, rules in jobs.items()))


# -- files the settings name ----------------------------------------------------------------

def _check_files(config: CollectorConfig, sources: Sources) -> list[str]:
    """Loads the TLS, tokens and web-config files once, so a bad one stops the collector
    at start."""
    def named(key: str) -> str:
        return f"{key} (from {sources.source_of(key)})"

    errors = []
    if bool(config.grpc_tls_cert_file) != bool(config.grpc_tls_key_file):
        errors.append(f"{named('grpc_tls_cert_file')} and {named('grpc_tls_key_file')} go "
                      "together")
    elif config.grpc_tls_client_ca_file and not config.grpc_tls_cert_file:
        errors.append(f"{named('grpc_tls_client_ca_file')}: mutual TLS needs "
                      "grpc_tls_cert_file and grpc_tls_key_file")
    elif config.grpc_tls_cert_file:
        try:
            ServerCertificates(config.grpc_tls_cert_file, config.grpc_tls_key_file,
                               config.grpc_tls_client_ca_file)
        except OSError as error:
            errors.append(f"{named('grpc_tls_cert_file')}: {error}")
    if config.tokens_file:
        try:
            load_tokens(config.tokens_file)
        except TokensFileError as error:
            errors.append(f"{named('tokens_file')}: {error}")
    if config.web_config_file:
        try:
            web_config.load(config.web_config_file)
        except web_config.WebConfigError as error:
            errors.append(f"{named('web_config_file')}: {config.web_config_file}: {error}")
    return errors
