"""The demo's real processes: a ``gradwatch collector`` subprocess and a webhook receiver,
both on loopback ports and cleaned up on exit. Tests use them too (``tests/support``)."""

from __future__ import annotations

import base64
import json
import os
import signal
import ssl
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
    (``https://`` when its web-config file turns TLS on) are valid once the context is
    entered."""

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
                log = self.log()
                self.__exit__(None, None, None)
                raise RuntimeError(f"collector did not start; log:\n{log}")
            time.sleep(0.05)
        addresses = json.loads(ready.read_text())
        self.grpc_target = addresses["grpc"]
        self.metrics_url = f"{addresses['metrics_scheme']}://{addresses['metrics']}/metrics"
        return self

    def scrape(self, timeout_s: float = 5.0, *, context: ssl.SSLContext | None = None,
               auth: tuple[str, str] | None = None) -> str:
        """GET `metrics_url`, with ``context`` for HTTPS and ``auth`` as (user, password)
        for basic auth; raises urllib.error.HTTPError on 401."""
        request = urllib.request.Request(self.metrics_url)
        if auth is not None:
            token = base64.b64encode(":".join(auth).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=timeout_s, context=context) as response:
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
