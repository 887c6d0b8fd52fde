"""Real Prometheus (Debian package) for integration tests, on loopback, cleaned up after."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_binary(name: str) -> str:
    """The binary's path; a test needing it fails in CI (which installs it) and is
    skipped elsewhere with the install hint."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not installed (make test installs it with apt-get)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


class PrometheusProcess:
    """``prometheus`` scraping ``targets`` every 500 ms, with its own storage."""

    def __init__(self, targets: list[str], scrape_interval: str = "500ms") -> None:
        self.binary = require_binary("prometheus")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._tmp = tempfile.TemporaryDirectory(prefix="gradwatch-prometheus-")
        config = Path(self._tmp.name) / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "gradwatch",
                                "static_configs": [{"targets": targets}]}],
        }))
        self._args = [self.binary, f"--config.file={config}",
                      f"--storage.tsdb.path={self._tmp.name}/data",
                      f"--web.listen-address=127.0.0.1:{self.port}"]
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> PrometheusProcess:
        self._log = open(Path(self._tmp.name) / "prometheus.log", "w")
        self.process = subprocess.Popen(self._args, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1):
                    return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError("prometheus did not become ready") from None
                time.sleep(0.1)

    def query(self, promql: str) -> list[dict]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_for(self, promql: str, timeout_s: float = 30.0) -> list[dict]:
        """The first non-empty result of ``promql``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            result = self.query(promql)
            if result:
                return result
            time.sleep(0.25)
        raise AssertionError(f"no result for {promql} within {timeout_s} s")

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if hasattr(self, "_log"):
            self._log.close()
        self._tmp.cleanup()


class AlertmanagerProcess:
    """``prometheus-alertmanager`` on loopback, clustering off, routing every alert to
    ``webhook_url`` at once."""

    def __init__(self, webhook_url: str) -> None:
        self.binary = require_binary("prometheus-alertmanager")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._tmp = tempfile.TemporaryDirectory(prefix="gradwatch-alertmanager-")
        config = Path(self._tmp.name) / "alertmanager.yml"
        config.write_text(json.dumps({
            "route": {"receiver": "hook", "group_by": ["alertname", "training_job"],
                      "group_wait": "0s", "group_interval": "1s", "repeat_interval": "1h"},
            "receivers": [{"name": "hook", "webhook_configs": [{"url": webhook_url}]}],
        }))
        self._args = [self.binary, f"--config.file={config}",
                      f"--storage.path={self._tmp.name}/data",
                      f"--web.listen-address=127.0.0.1:{self.port}",
                      "--cluster.listen-address="]
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> AlertmanagerProcess:
        self._log = open(Path(self._tmp.name) / "alertmanager.log", "w")
        self.process = subprocess.Popen(self._args, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1):
                    return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError("alertmanager did not become ready") from None
                time.sleep(0.1)

    def alerts(self, **labels: str) -> list[dict]:
        """``GET /api/v2/alerts`` (active, unresolved) filtered by label equality."""
        query = urllib.parse.urlencode(
            [("filter", f'{k}="{v}"') for k, v in labels.items()])
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts?{query}", timeout=5) as r:
            return json.load(r)

    def wait_for(self, predicate, timeout_s: float = 15.0, **labels: str) -> list[dict]:
        """Polls `alerts` until ``predicate(alerts)`` holds; returns the alerts."""
        deadline = time.monotonic() + timeout_s
        while True:
            alerts = self.alerts(**labels)
            if predicate(alerts):
                return alerts
            if time.monotonic() > deadline:
                raise AssertionError(f"alertmanager alerts {labels}: {alerts}")
            time.sleep(0.1)

    __exit__ = PrometheusProcess.__exit__
