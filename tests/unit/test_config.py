"""Collector configuration: each setting declared once; flags, GRADWATCH_* variables and
the YAML file merged, then checked together, every error naming the setting and where its
value came from."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from gradwatch.collector import config
from gradwatch.collector.ingest import Limits
from gradwatch.collector.settings import declared

ROOT = Path(__file__).resolve().parents[2]


def parse(*argv: str, environ: dict | None = None) -> config.CollectorConfig:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return config.load(parser.parse_args(list(argv)), environ=environ or {})


def errors(*argv: str, environ: dict | None = None) -> list[str]:
    with pytest.raises(config.ConfigError) as raised:
        parse(*argv, environ=environ)
    return raised.value.errors


def write(tmp_path, data, name="collector.yaml") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_defaults():
    settings = parse()
    assert settings.grpc_address == "127.0.0.1:8470" and settings.resolve_after_seconds == 10.0
    assert settings.rules.for_job("x")["GradientVanishing"].steps == 100
    assert settings.limits == Limits()


def test_file_then_environment_then_flag(tmp_path):
    path = write(tmp_path, {"resolve_after_seconds": 3, "webhook_urls": ["http://a/hook"],
                            "rules": {"GradientExploding": {"max_norm": 50}},
                            "jobs": {"bert-*": {"GradientVanishing": {"steps": 7}}},
                            "limits": {"max_jobs": 9}})
    settings = parse("--config", path, "--webhook-url", "http://b/hook",
                     environ={"GRADWATCH_WEBHOOK_URLS": "http://c/hook"})
    assert settings.resolve_after_seconds == 3.0 and settings.limits.max_jobs == 9
    assert settings.webhook_urls == ["http://a/hook", "http://c/hook", "http://b/hook"]
    assert settings.rules.for_job("resnet")["GradientExploding"].max_norm == 50.0
    assert settings.rules.for_job("bert-base")["GradientVanishing"].steps == 7
    assert settings.rules.for_job("bert-base")["GradientExploding"].max_norm == 50.0
    environ = {"GRADWATCH_RESOLVE_AFTER": "4", "GRADWATCH_LIMITS_MAX_JOBS": "8"}
    assert parse("--config", path, environ=environ).resolve_after_seconds == 4.0
    assert parse("--config", path, environ=environ).limits.max_jobs == 8
    flags = parse("--config", path, "--resolve-after", "5", "--limits.max-jobs", "7",
                  environ=environ)
    assert (flags.resolve_after_seconds, flags.limits.max_jobs) == (5.0, 7)


def test_every_setting_has_a_flag_a_variable_and_a_yaml_key():
    items = list(declared(config.CollectorConfig))
    assert len(items) >= 30
    for attribute in ("flag", "env", "key"):
        values = [getattr(item, attribute) for item in items]
        assert len(set(values)) == len(values), attribute
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    text = parser.format_help()
    for item in items:
        assert item.flag in text and item.env in text, item.key
    assert "setting:" not in text  # argparse's destinations are ours, not the user's
    assert "--limits.max-jobs MAX_JOBS" in text


@pytest.mark.parametrize("source", ["flag", "env", "yaml"])
@pytest.mark.parametrize("key, value, message", [
    ("resolve_after_seconds", "-1", "must be at least 0"),
    ("max_variable_series", "-5", "must be at least 0"),
    ("evaluation_interval_seconds", "0", "must be above 0"),
    ("grpc_keepalive_seconds", "soon", "expected a number"),
    ("grpc_address", "8470", "expected HOST:PORT"),
    ("limits.max_jobs", "0", "must be at least 1"),
    ("limits.max_jobs", "many", "expected an integer"),
    # Only the scheme was checked: these started the collector (the last, two URLs in one
    # variable separated by a space, as one sink named after both).
    ("alertmanager_urls", "http://", "has no host"),
    ("webhook_urls", "http://h:99999/hook", "bad port"),
    ("webhook_urls", "http://a/hook http://b/hook",
     "must not contain whitespace (separate several URLs with commas)"),
])
def test_a_bad_value_from_any_source_is_refused(tmp_path, source, key, value, message):
    item = next(i for i in declared(config.CollectorConfig) if i.key == key)
    if source == "flag":
        found, origin = errors(item.flag, value), item.flag
    elif source == "env":
        found, origin = errors(environ={item.env: value}), item.env
    else:
        section, _, name = key.rpartition(".")
        data = {section: {name: value}} if section else {
            key: [value] if item.setting.repeatable else value}
        path = write(tmp_path, json.dumps(data).replace(f'"{value}"', value)
                     if value.lstrip("-").isdigit() else data)
        found, origin = errors("--config", path), path
    assert len(found) == 1, found
    assert found[0].startswith(f"{key} = ") and f"(from {origin}): {message}" in found[0]


def test_every_error_is_reported_at_once(tmp_path):
    path = write(tmp_path, {"resolve_after_seconds": "soon", "colour": "blue",
                            "rules": {"GradientMisssing": {},
                                      "GradientVanishing": {"steps": 1.5}},
                            "limits": {"max_job": 5}})
    found = errors("--config", path, "--max-variable-series", "-5",
                   environ={"GRADWATCH_RESOLVE_AFTER": "-3",
                            "GRADWATCH_ALERTMANAGER_URLS": "alertmanager:9093"})
    text = "\n".join(found)
    assert len(found) == 7, text
    for expected in (
        f"colour: unknown setting (from {path}); known: ",
        f"limits.max_job: unknown setting (from {path}); known: max_batch_steps",
        "resolve_after_seconds = '-3' (from GRADWATCH_RESOLVE_AFTER): must be at least 0",
        "max_variable_series = '-5' (from --max-variable-series): must be at least 0",
        "alertmanager_urls = 'alertmanager:9093' (from GRADWATCH_ALERTMANAGER_URLS): must "
        "start with http://",
        f"rules.GradientMisssing: unknown alert (from {path})",
        f"rules.GradientVanishing.steps: expected int, got 1.5 (from {path})",
    ):
        assert expected in text


@pytest.mark.parametrize("data, message", [
    ({"rules": {"WorkerSilent": {"enabled": "yes"}}}, "rules.WorkerSilent.enabled: expected bool"),
    ({"jobs": {"a*": {"GradientExploding": {"limit": 1}}}},
     "jobs.a*.GradientExploding.limit: unknown setting"),
    ({"limits": [1]}, "limits: expected a mapping"),
    ({"webhook_urls": "http://a"}, "webhook_urls: expected a list"),
    ("rules: [unclosed", "collector.yaml"),
    # Thresholds that would page healthy jobs ("0x the median of the last 0 steps"):
    ({"rules": {"GradientVanishing": {"steps": 0}}},
     "rules.GradientVanishing.steps: must be greater than 0, got 0"),
    ({"rules": {"WorkerSilent": {"seconds": 0}}},
     "rules.WorkerSilent.seconds: must be greater than 0, got 0.0"),
    ({"jobs": {"a*": {"GradientExploding": {"median_factor": 1}}}},
     "jobs.a*.GradientExploding.median_factor: must be greater than 1, got 1.0"),
    ({"rules": {"GradientExploding": {"window_steps": 0}}},
     "rules.GradientExploding.window_steps: must be greater than 0"),
    ({"rules": {"ReplicaDivergence": {"norm_ratio": 0.5}}},
     "rules.ReplicaDivergence.norm_ratio: must be greater than 1"),
    ("rules: {GradientExploding: {max_norm: .nan}}",
     "rules.GradientExploding.max_norm: must not be negative, got nan"),
])
def test_invalid_file_settings_name_the_field(tmp_path, data, message):
    (found,) = errors("--config", write(tmp_path, data))
    assert message in found


def test_the_shipped_example_is_valid_and_documents_every_default():
    example = ROOT / "deploy" / "collector.example.yaml"
    loaded = config.load(config_file=str(example), environ={})
    defaults = config.CollectorConfig()
    for item in declared(config.CollectorConfig):  # (one without default, commented out)
        name = item.key.rpartition(".")[2]
        assert f"{name}:" in example.read_text(), f"{item.key} is not in the example"
    assert loaded.limits == defaults.limits
    for item in declared(config.CollectorConfig):
        if not item.section:
            assert getattr(loaded, item.attribute) == getattr(defaults, item.attribute), item
    assert loaded.rules.base == defaults.rules.base
    assert loaded.rules.for_job("bert-base")["GradientVanishing"].steps == 500


def missing_gradient_annotations(settings: config.CollectorConfig,
                                 job: str = "job") -> dict[str, str]:
    """The annotations of the GradientMissing alert that a collector with ``settings``
    raises for a one-variable session whose gradient is missing."""
    from gradwatch.collector.alerts import AlertTracker
    from gradwatch.collector.ingest import decode_batch
    from gradwatch.collector.rules import RuleEngine
    from gradwatch.collector.state import Registry
    from tests.support import wire

    tracker = AlertTracker(lambda notification: None, 0.0)
    engine = RuleEngine(settings.rules, tracker, runbook_url=settings.runbook_url,
                        dashboard_base_url=settings.dashboard_base_url)
    session = Registry().register(job, "adam", "worker", 0, 1, ["a"])
    batch = decode_batch(wire.batch(session.id, 1, wire.step(0, [0])), 1, 1, Limits())
    session.apply(1, batch)
    engine.on_batch(session, batch)
    (alert,) = tracker.active()
    return alert.annotations


def test_runbook_url_reaches_the_alerts(tmp_path):
    path = write(tmp_path, "runbook_url: https://wiki.example/gradwatch\n")
    annotations = missing_gradient_annotations(config.load(config_file=path, environ={}))
    assert annotations["runbook_url"] == "https://wiki.example/gradwatch#gradientmissing"


def test_dashboard_base_url_links_alerts_to_their_panel(tmp_path):
    from gradwatch.collector.links import ALERT_PANELS

    path = write(tmp_path, "dashboard_base_url: https://grafana.example/\n")
    settings = config.load(config_file=path, environ={})
    assert missing_gradient_annotations(settings, "my job")["dashboard_url"] == (
        "https://grafana.example/d/gradwatch-job/gradwatch-job?var-training_job=my+job"
        f"&var-optimizer=adam&viewPanel={ALERT_PANELS['GradientMissing']}")
    assert "dashboard_url" not in missing_gradient_annotations(config.CollectorConfig())


def test_grpc_security_files_are_relative_to_the_config_file_and_checked(tmp_path):
    from tests.support.certificates import make_certificates

    certificates = make_certificates(tmp_path)
    (tmp_path / "tokens.yaml").write_text(
        "tokens:\n  - name: a\n    token: aaaaaaaaaaaaaaaa\n    training_jobs: ['*']\n")
    path = write(tmp_path, {"grpc_tls_cert_file": "server.pem",
                            "grpc_tls_key_file": "server-key.pem",
                            "grpc_tls_client_ca_file": "ca.pem", "tokens_file": "tokens.yaml"})
    settings = parse("--config", path)
    assert settings.grpc_tls_cert_file == str(certificates.server_cert)
    assert settings.grpc_tls_client_ca_file == str(certificates.ca)
    assert settings.tokens_file == str(tmp_path / "tokens.yaml")


@pytest.mark.parametrize("argv, message", [
    (["--grpc-tls-cert-file", "server.pem"],
     "grpc_tls_cert_file (from --grpc-tls-cert-file) and grpc_tls_key_file (from default) "
     "go together"),
    (["--grpc-tls-client-ca-file", "ca.pem"], "mutual TLS needs"),
    (["--grpc-tls-cert-file", "/nowhere.pem", "--grpc-tls-key-file", "/nowhere-key.pem"],
     "grpc_tls_cert_file (from --grpc-tls-cert-file): "),
    (["--tokens-file", "/nowhere.yaml"], "tokens_file (from --tokens-file): /nowhere.yaml"),
])
def test_invalid_grpc_security_settings_name_the_field(argv, message):
    (found,) = errors(*argv)
    assert message in found
