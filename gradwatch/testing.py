"""Real processes for tests and demos: a collector subprocess and a webhook receiver.

Both bind loopback ports chosen by the OS, are context managers, and clean up
after themselves. No TensorFlow needed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class CollectorProcess:
    """``gradwatch collector`` on free loopback ports; `grpc_target` and `metrics_url`
    are valid once the context is entered."""

    def __init__(self, *extra_args: str, startup_timeout_s: float = 30.0,
                 log_path: str | os.PathLike | None = None) -> None:
        self.extra_args = list(extra_args)
        self.startup_timeout_s = startup_timeout_s
        self._tmp = tempfile.TemporaryDirectory(prefix="gradwatch-collector-")
        self.log_path = Path(log_path or Path(self._tmp.name) / "collector.log")
        self.process: subprocess.Popen | None = None
        self.grpc_target = ""
        self.metrics_url = ""

    def __enter__(self) -> CollectorProcess:
        ready = Path(self._tmp.name) / "ready.json"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gradwatch", "collector",
             "--grpc-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0",
             "--ready-file", str(ready), *self.extra_args],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout_s
        while not ready.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"collector did not start; log:\n{self.log()}")
            time.sleep(0.05)
        addresses = json.loads(ready.read_text())
        self.grpc_target = addresses["grpc"]
        self.metrics_url = f"http://{addresses['metrics']}/metrics"
        return self

    def scrape(self, timeout_s: float = 5.0) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=timeout_s) as response:
            return response.read().decode()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM (graceful), then SIGKILL after ``timeout_s``; returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        if hasattr(self, "_log"):
            self._log.close()
        self._tmp.cleanup()


class WebhookReceiver:
    """An HTTP server that records every JSON body POSTed to it (any path)."""

    def __init__(self) -> None:
        self.bodies: list = []
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"null")
                with receiver._changed:
                    receiver.bodies.append(body)
                    receiver._changed.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/alerts"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def alerts(self) -> list[dict]:
        """Every alert received, in order (bodies are lists of alerts)."""
        with self._changed:
            return [a for body in self.bodies for a in body]

    def wait_for(self, predicate, timeout_s: float = 30.0) -> dict | None:
        """The first alert matching ``predicate``, waiting up to ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for alert in (a for body in self.bodies for a in body):
                    if predicate(alert):
                        return alert
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._changed.wait(remaining)

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
