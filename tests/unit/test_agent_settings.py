"""Agent settings: arguments win over GRADWATCH_* variables; every bad value is reported
at once, naming the setting and its source; a monitor with a bad setting disables
itself with one log line and never raises."""

from __future__ import annotations

import logging

import pytest

from gradwatch.agent.core.channel import ChannelSettings
from gradwatch.agent.core.monitor import MonitorCore
from gradwatch.agent.core.settings import AgentSettings, SettingsError


def test_defaults_then_environment_then_arguments():
    assert AgentSettings.resolve({}) == AgentSettings()
    environ = {"GRADWATCH_TLS_CA_FILE": "/ca.pem", "GRADWATCH_TOKEN": "env-token",
               "GRADWATCH_MAX_BUFFER_BYTES": "1024", "GRADWATCH_DISABLED": "1",
               "GRADWATCH_DIAGNOSE": "no", "GRADWATCH_TASK_INDEX": "3",
               "GRADWATCH_TRAINING_JOB": ""}  # empty: unset (a Downward API label not there)
    settings = AgentSettings.resolve(environ, token="argument-token")
    assert settings.tls_ca_file == "/ca.pem" and settings.max_buffer_bytes == 1024
    assert settings.token == "argument-token", "arguments win"
    assert not settings.enabled and not settings.diagnose and settings.task_index == 3
    assert settings.training_job is None
    assert AgentSettings.resolve(environ, enabled=True).enabled
    assert ChannelSettings.of(settings).secure


def test_every_bad_value_is_reported_with_its_source():
    environ = {"GRADWATCH_TASK_INDEX": "abc", "GRADWATCH_ACK_TIMEOUT": "-1",
               "GRADWATCH_COLLECTOR": "no-port", "GRADWATCH_DISABLED": "maybe"}
    with pytest.raises(SettingsError) as raised:
        AgentSettings.resolve(environ, buffer_steps=0, tls_cert_file="/client.pem")
    errors = raised.value.errors
    assert len(errors) == 6, errors
    text = "\n".join(errors)
    assert "task_index = 'abc' (from GRADWATCH_TASK_INDEX): expected an integer" in text
    assert "ack_timeout_s = '-1' (from GRADWATCH_ACK_TIMEOUT): must be at least 0.1" in text
    assert "collector = 'no-port' (from GRADWATCH_COLLECTOR)" in text
    assert "enabled = 'maybe' (from GRADWATCH_DISABLED)" in text
    assert "buffer_steps = 0 (from argument buffer_steps): must be at least 1" in text
    assert "tls_cert_file is set (from argument tls_cert_file) but tls_key_file is not" in text


@pytest.mark.parametrize(("arguments", "error"), [
    ({"task_index": float("inf")}, "task_index = inf (from argument task_index): expected a"),
    ({"flush_interval_s": 10**400}, "flush_interval_s = 1000000"),
    ({"task_index": 2**32}, "must be at most 4.29497e+09"),
    ({"task_index": 2.5}, "expected an integer"),
    ({"buffer_steps": 10**12}, "must be at most 65536"),
    ({"flush_interval_s": 5e-324}, "must be at least 0.001"),
    ({"training_job": "a\x01b"}, "must not contain control characters"),
    ({"task_type": 7}, "expected text, not int"),
    ({"collector": b"127.0.0.1:1"}, "expected text, not bytes"),
    ({"token": "two words"}, "printable ASCII without spaces"),
    ({"enabled": object()}, "enabled = <object object"),
])
def test_any_value_of_any_type_is_refused_with_a_reason_never_raised(arguments, error):
    """Whatever the type (objects, huge ints, inf), a bad value is a `SettingsError`, and
    values the wire, the collector or gRPC would refuse later are refused here."""
    with pytest.raises(SettingsError) as raised:
        AgentSettings.resolve({}, **arguments)
    assert error in str(raised.value)


def test_unknown_argument_is_a_programming_error():
    with pytest.raises(TypeError, match="colour"):
        AgentSettings.resolve({}, colour="blue")


def test_every_setting_has_its_own_variable():
    variables = AgentSettings.environment_variables()
    assert len(set(variables.values())) == len(variables)
    assert all(v.startswith("GRADWATCH_") for v in variables.values())


@pytest.mark.parametrize("environ", [
    {"GRADWATCH_TASK_INDEX": "abc"},
    {"GRADWATCH_MAX_BUFFER_BYTES": "lots"},
    {"GRADWATCH_COLLECTOR": "localhost"},
    {"GRADWATCH_TLS_CERT_FILE": "/only-the-certificate.pem"},
])
def test_a_misconfigured_monitor_disables_itself_with_one_line(monkeypatch, caplog, environ):
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        monitor = MonitorCore()
    assert not monitor.enabled
    assert monitor.close() is True
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "disabled, invalid settings" in lines[0].getMessage()
    assert next(iter(environ)) in lines[0].getMessage()


def test_a_misspelt_variable_is_named_with_the_setting_meant():
    """``GRADWATCH_COLECTOR`` would otherwise leave the default collector in use, without a
    word; the collector's own variables (which may share an environment) are not flagged."""
    from gradwatch.agent.core.settings import AgentSettings

    environ = {"GRADWATCH_COLECTOR": "c:8470", "GRADWATCH_DISABLE": "1",
               "GRADWATCH_COLLECTOR": "c:8470", "GRADWATCH_RESOLVE_AFTER": "30",
               "GRADWATCH_CONFIG": "collector.yaml", "GRADWATCH_LOG_LEVEL": "debug",
               # close to the agent's GRADWATCH_TLS_CERT_FILE and GRADWATCH_TOKEN_FILE:
               "GRADWATCH_GRPC_TLS_CERT_FILE": "server.pem",
               "GRADWATCH_GRPC_TLS_KEY_FILE": "server.key",
               "GRADWATCH_TOKENS_FILE": "tokens.yaml"}
    assert AgentSettings.misspelt_variables(environ) == {
        "GRADWATCH_COLECTOR": "GRADWATCH_COLLECTOR", "GRADWATCH_DISABLE": "GRADWATCH_DISABLED"}


def test_no_collector_variable_is_taken_for_a_typo_of_an_agents():
    """Both may share an environment (a compose file, a shell): ``GRADWATCH_TOKENS_FILE``
    was "did you mean GRADWATCH_TOKEN_FILE?", which points the agent at the collector's
    token list. The agent does not import the collector: this keeps its list complete."""
    from gradwatch.agent.core.settings import AgentSettings
    from gradwatch.collector.config import environment_variables

    assert AgentSettings.misspelt_variables({v: "x" for v in environment_variables()}) == {}


def test_a_misspelt_variable_is_one_warning_when_the_monitor_starts(monkeypatch, caplog):
    import logging

    from gradwatch.agent.core.monitor import MonitorCore

    monkeypatch.setenv("GRADWATCH_COLECTOR", "127.0.0.1:9")
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        MonitorCore(enabled=False)
    assert [r.getMessage() for r in caplog.records] == [
        "gradwatch: GRADWATCH_COLECTOR is not a setting (ignored); did you mean "
        "GRADWATCH_COLLECTOR?"]
