"""Collector configuration: precedence, the YAML file, and errors that name the field."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from gradwatch.collector import config


def parse(*argv: str) -> config.CollectorConfig:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return config.from_arguments(parser.parse_args(list(argv)))


def write(tmp_path, data) -> str:
    path = tmp_path / "collector.yaml"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_defaults(monkeypatch):
    for name in ("GRADWATCH_GRPC_ADDRESS", "GRADWATCH_RESOLVE_AFTER", "GRADWATCH_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    settings = parse()
    assert settings.grpc_address == "127.0.0.1:8470" and settings.resolve_after_s == 10.0
    assert settings.rules.for_job("x")["GradientVanishing"].steps == 100


def test_file_then_environment_then_flag(tmp_path, monkeypatch):
    path = write(tmp_path, {"resolve_after_seconds": 3, "webhook_urls": ["http://a/hook"],
                            "rules": {"GradientExploding": {"max_norm": 50}},
                            "jobs": {"bert-*": {"GradientVanishing": {"steps": 7}}}})
    monkeypatch.delenv("GRADWATCH_RESOLVE_AFTER", raising=False)
    settings = parse("--config", path, "--webhook-url", "http://b/hook")
    assert settings.resolve_after_s == 3.0
    assert settings.webhook_urls == ["http://a/hook", "http://b/hook"]
    assert settings.rules.for_job("resnet")["GradientExploding"].max_norm == 50.0
    assert settings.rules.for_job("bert-base")["GradientVanishing"].steps == 7
    assert settings.rules.for_job("bert-base")["GradientExploding"].max_norm == 50.0
    monkeypatch.setenv("GRADWATCH_RESOLVE_AFTER", "4")
    assert parse("--config", path).resolve_after_s == 4.0
    assert parse("--config", path, "--resolve-after", "5").resolve_after_s == 5.0


@pytest.mark.parametrize("data, message", [
    ({"resolve_after_seconds": "soon"}, "resolve_after_seconds: expected float"),
    ({"resolve_after_seconds": -1}, "resolve_after_seconds: must not be negative"),
    ({"grpc_keepalive_seconds": 0}, "grpc_keepalive_seconds: must be positive"),
    ({"colour": "blue"}, "colour: unknown setting"),
    ({"rules": {"GradientMisssing": {}}}, "rules.GradientMisssing: unknown alert"),
    ({"rules": {"GradientVanishing": {"steps": 1.5}}},
     "rules.GradientVanishing.steps: expected int"),
    ({"rules": {"WorkerSilent": {"enabled": "yes"}}}, "rules.WorkerSilent.enabled: expected bool"),
    ({"jobs": {"a*": {"GradientExploding": {"limit": 1}}}},
     "jobs.a*.GradientExploding.limit: unknown setting"),
    ({"alertmanager_urls": ["alertmanager:9093"]}, "must start with http://"),
    ({"limits": {"max_jobs": 0}}, "limits.max_jobs: must be at least 1"),
    ({"limits": {"max_jobs": "many"}}, "limits.max_jobs: expected int"),
    ({"limits": {"max_job": 5}}, "limits.max_job: unknown limit; known: max_message_bytes"),
    ({"limits": [1]}, "limits: expected a mapping"),
    ("rules: [unclosed", "collector.yaml"),
])
def test_invalid_settings_name_the_field(tmp_path, data, message):
    with pytest.raises(config.ConfigError, match=message.replace("*", r"\*").replace(
            "[", r"\[")):
        parse("--config", write(tmp_path, data))


def test_limits_from_the_file_override_defaults_one_by_one(tmp_path):
    from gradwatch.collector.ingest import Limits

    settings = parse("--config", write(tmp_path, {"limits": {"max_jobs": 3,
                                                             "max_sessions_per_job": 64}}))
    assert settings.limits == Limits(max_jobs=3, max_sessions_per_job=64)


def test_collector_refuses_to_start_with_invalid_config(tmp_path):
    path = write(tmp_path, {"rules": {"GradientExploding": {"max_norm": "big"}}})
    result = subprocess.run([sys.executable, "-m", "gradwatch", "collector", "--config", path],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "invalid configuration: rules.GradientExploding.max_norm: expected float" in \
        result.stderr


def test_the_shipped_example_is_valid_and_documents_the_defaults():
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "deploy" / "collector.example.yaml"
    loaded = config.load_file(str(example), config.CollectorConfig())
    defaults = config.CollectorConfig()
    for field in ("max_variable_series", "resolve_after_s", "resend_interval_s",
                  "evaluation_interval_s", "closed_retention_s", "grpc_keepalive_s",
                  "grpc_keepalive_timeout_s"):
        assert getattr(loaded, field) == getattr(defaults, field), field
    assert loaded.rules.base == defaults.rules.base
    assert loaded.limits == defaults.limits
    assert loaded.rules.for_job("bert-base")["GradientVanishing"].steps == 500


def test_runbook_url_reaches_the_alerts(tmp_path):
    from gradwatch.collector.alerts import AlertTracker
    from gradwatch.collector.rules import RuleEngine
    from gradwatch.collector.state import Registry

    path = tmp_path / "collector.yaml"
    path.write_text("runbook_url: https://wiki.example/gradwatch\n")
    settings = config.load_file(str(path), config.CollectorConfig())
    tracker = AlertTracker(lambda notification: None, 0.0)
    engine = RuleEngine(settings.rules, tracker, runbook_url=settings.runbook_url)
    registry = Registry()
    session = registry.register("job", "adam", "worker", 0, 1, ["a"])
    session.missing_in_last_batch[:] = True
    session.steps_total = 1
    engine.evaluate(session.group)
    (alert,) = tracker.active()
    assert alert.annotations["runbook_url"] == "https://wiki.example/gradwatch#gradientmissing"


def test_grpc_security_files_are_relative_to_the_config_file_and_checked(tmp_path):
    from gradwatch.testing import make_certificates

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
    (["--grpc-tls-cert-file", "server.pem"], "go together"),
    (["--grpc-tls-client-ca-file", "ca.pem"], "mutual TLS needs"),
    (["--grpc-tls-cert-file", "/nowhere.pem", "--grpc-tls-key-file", "/nowhere-key.pem"],
     "grpc_tls: .*nowhere.pem"),
    (["--tokens-file", "/nowhere.yaml"], "tokens_file: /nowhere.yaml"),
])
def test_invalid_grpc_security_settings_name_the_field(argv, message):
    with pytest.raises(config.ConfigError, match=message):
        parse(*argv)


def test_collector_says_why_it_cannot_start_when_its_port_is_taken():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "gradwatch", "collector", "--grpc-address", "127.0.0.1:0",
             "--metrics-address", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "cannot start" in result.stderr and "address already in use" in result.stderr
    assert "Traceback" not in result.stderr
