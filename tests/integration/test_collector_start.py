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
         "--resolve-after", "-1"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "invalid configuration (2 errors):" in result.stderr
    assert "rules.GradientExploding.max_norm: expected float, got 'big'" in result.stderr
    assert "resolve_after_seconds = '-1' (from --resolve-after)" in result.stderr
    assert "Traceback" not in result.stderr


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
