"""``gradwatch collector`` refuses to start, with every reason and no traceback, when its
settings are wrong or its port is taken."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_collector_refuses_to_start_with_every_error_listed(tmp_path):
    path = tmp_path / "collector.yaml"
    path.write_text(json.dumps({"rules": {"GradientExploding": {"max_norm": "big"}}}))
    result = subprocess.run(
        [sys.executable, "-m", "gradwatch", "collector", "--config", str(path),
         "--resolve-after", "-1", "--grpc-address", "127.0.0.1:99999"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "invalid configuration (3 errors):" in result.stderr
    assert "rules.GradientExploding.max_norm: expected float, got 'big'" in result.stderr
    assert "resolve_after_seconds = '-1' (from --resolve-after)" in result.stderr
    assert "port 99999 out of range (0 to 65535)" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("taken_port", ["grpc", "metrics"])
def test_collector_says_why_it_cannot_start_when_its_port_is_taken(taken_port):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        addresses = {"grpc": "127.0.0.1:0", "metrics": "127.0.0.1:0",
                     taken_port: f"127.0.0.1:{port}"}
        result = subprocess.run(
            [sys.executable, "-m", "gradwatch", "collector",
             "--grpc-address", addresses["grpc"], "--metrics-address", addresses["metrics"]],
            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    flag = {"grpc": "gRPC address", "metrics": "metrics address"}[taken_port]
    assert f"cannot start: cannot bind {flag} 127.0.0.1:{port} (--{taken_port}-address" \
        in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_sighup_is_ignored_with_a_line_and_sigterm_still_drains(tmp_path):
    """Prometheus and Alertmanager reload their configuration on SIGHUP; an engineer may
    send it to the collector too, which must neither die nor pretend to reload."""
    import signal
    import time

    ready = tmp_path / "ready.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "gradwatch", "collector", "--grpc-address", "127.0.0.1:0",
         "--metrics-address", "127.0.0.1:0", "--ready-file", str(ready)],
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert process.poll() is None, "SIGHUP killed the collector"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
    stderr = process.stderr.read()
    assert "SIGHUP ignored: the collector does not reload its configuration" in stderr
    assert "Traceback" not in stderr


def test_metrics_say_the_text_format_they_are_in():
    """The body is text format 0.0.4; the header said version=1.0.0 (client_python's
    latest), which a Prometheus negotiating formats may read otherwise."""
    import urllib.request

    from tests.support.services import CollectorProcess

    with CollectorProcess() as collector, \
            urllib.request.urlopen(collector.metrics_url, timeout=10) as response:
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
