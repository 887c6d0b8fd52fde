"""Services the tests run for real: the collector and a webhook receiver (from the demo),
the Debian-packaged Prometheus and Alertmanager, and the port and binary helpers."""

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
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from gradwatch.demo.processes import CollectorProcess, WebhookReceiver

__all__ = ["AlertmanagerProcess", "CollectorProcess", "PrometheusProcess", "WebhookReceiver",
           "free_port", "require_binary"]


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


def free_port() -> int:
    """A port that was free a moment ago (for programs that cannot take port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _ServiceProcess:
    """A server binary with a temporary working folder, started and awaited via ``/-/ready``."""

    binary_name = ""

    def __init__(self) -> None:
        binary = shutil.which(self.binary_name)
        if binary is None:
            raise FileNotFoundError(f"{self.binary_name} is not installed (Debian package; "
                                    "scripts/bootstrap.sh installs it)")
        self.binary = binary
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._tmp = tempfile.TemporaryDirectory(prefix=f"gradwatch-{self.binary_name}-")
        self.folder = Path(self._tmp.name)
        self.args: list[str] = []
        self.process: subprocess.Popen | None = None

    def __enter__(self):
        self._log = open(self.folder / "output.log", "w")
        self.process = subprocess.Popen([self.binary, *self.args], stdout=self._log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1):
                    return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = self.log()
                    self.__exit__()
                    raise RuntimeError(f"{self.binary_name} did not become ready:\n{log}"
                                       ) from None
                time.sleep(0.1)

    def get_json(self, path: str, **query: str) -> object:
        url = f"{self.url}{path}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)

    def log(self) -> str:
        path = self.folder / "output.log"
        return path.read_text() if path.exists() else ""

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


class PrometheusProcess(_ServiceProcess):
    """``prometheus`` scraping ``targets`` (job ``gradwatch``), optionally evaluating
    ``rule_files`` and sending alerts to an Alertmanager. ``scrape_options`` are added to
    the scrape config as they are, in Prometheus' names: e.g. ``{"scheme": "https",
    "tls_config": {"ca_file": ...}, "basic_auth": {"username": ..., "password": ...}}``."""

    binary_name = "prometheus"

    def __init__(self, targets: list[str], scrape_interval: str = "500ms",
                 rule_files: list[str] = (), alertmanager_url: str | None = None,
                 evaluation_interval: str = "1s",
                 scrape_options: Mapping[str, object] | None = None) -> None:
        super().__init__()
        config = {  # JSON is YAML
            "global": {"scrape_interval": scrape_interval,
                       "evaluation_interval": evaluation_interval},
            "rule_files": [str(Path(f).resolve()) for f in rule_files],
            "scrape_configs": [{"job_name": "gradwatch",
                                "static_configs": [{"targets": targets}],
                                **(scrape_options or {})}],
        }
        if alertmanager_url:
            config["alerting"] = {"alertmanagers": [{"static_configs": [
                {"targets": [alertmanager_url.removeprefix("http://")]}]}]}
        (self.folder / "prometheus.yml").write_text(json.dumps(config))
        self.args = [f"--config.file={self.folder}/prometheus.yml",
                     f"--storage.tsdb.path={self.folder}/data",
                     f"--web.listen-address=127.0.0.1:{self.port}"]

    def query(self, promql: str) -> list[dict]:
        body = self.get_json("/api/v1/query", query=promql)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def query_range(self, promql: str, start: float, end: float, step: float) -> list[dict]:
        """``/api/v1/query_range``: a matrix (``values`` are ``[time, "value"]`` pairs)."""
        body = self.get_json("/api/v1/query_range", query=promql, start=f"{start:.3f}",
                             end=f"{end:.3f}", step=f"{step}")
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


class AlertmanagerProcess(_ServiceProcess):
    """``prometheus-alertmanager`` with clustering off, routing every alert to
    ``webhook_url`` (if given) at once."""

    binary_name = "prometheus-alertmanager"

    def __init__(self, webhook_url: str | None = None) -> None:
        super().__init__()
        receiver = {"name": "hook"}
        if webhook_url:
            receiver["webhook_configs"] = [{"url": webhook_url}]
        (self.folder / "alertmanager.yml").write_text(json.dumps({
            "route": {"receiver": "hook", "group_by": ["alertname", "training_job"],
                      "group_wait": "0s", "group_interval": "1s", "repeat_interval": "1h"},
            "receivers": [receiver],
        }))
        self.args = [f"--config.file={self.folder}/alertmanager.yml",
                     f"--storage.path={self.folder}/data",
                     f"--web.listen-address=127.0.0.1:{self.port}",
                     "--cluster.listen-address="]

    def alerts(self, **labels: str) -> list[dict]:
        """``GET /api/v2/alerts`` (active, unresolved) filtered by label equality."""
        query = urllib.parse.urlencode([("filter", f'{k}="{v}"') for k, v in labels.items()])
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts?{query}", timeout=5) as r:
            return json.load(r)

    def wait_for(self, predicate: Callable[[list[dict]], bool], timeout_s: float = 15.0,
                 **labels: str) -> list[dict]:
        """Polls `alerts` until ``predicate(alerts)`` holds; returns the alerts."""
        deadline = time.monotonic() + timeout_s
        while True:
            alerts = self.alerts(**labels)
            if predicate(alerts):
                return alerts
            if time.monotonic() > deadline:
                raise AssertionError(f"alertmanager alerts {labels}: {alerts}")
            time.sleep(0.05)
