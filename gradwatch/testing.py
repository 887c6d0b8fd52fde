"""Real processes for tests, demos and benchmarks, on loopback ports, cleaned up on exit.

`CollectorProcess` (``gradwatch collector``), `WebhookReceiver` (records POSTed
JSON), the Debian-packaged `PrometheusProcess` and `AlertmanagerProcess`, a
`TcpProxy` for network faults, and `make_certificates` for TLS. No TensorFlow
needed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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
                self.__exit__(None, None, None)
                raise RuntimeError(f"collector did not start; log:\n{self.log()}")
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


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_memory_mb(pid: int) -> dict[str, float]:
    """``VmRSS`` (resident now) and ``VmHWM`` (peak) of process ``pid``, in MiB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(value.split()[0]) / 1024
    return values


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


@dataclass(frozen=True)
class Certificates:
    """PEM files of a throw-away CA, a server certificate for 127.0.0.1/localhost and
    a client certificate, all signed by the CA (see `make_certificates`)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certificates(folder: str | os.PathLike, client_name: str = "gradwatch-agent"
                      ) -> Certificates:
    """Generates certificates for TLS and mutual-TLS tests into ``folder`` (needs the
    ``cryptography`` package, a dev dependency). Valid for one day."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(folder)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def issue(subject: str, key, issuer: str, issuer_key, *, ca: bool = False,
              usage=None, san=None) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(name(subject)).issuer_name(name(issuer))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(path: Path, *items) -> Path:
        pem = b""
        for item in items:
            if isinstance(item, x509.Certificate):
                pem += item.public_bytes(serialization.Encoding.PEM)
            else:
                pem += item.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
        path.write_bytes(pem)
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = issue("gradwatch test CA", ca_key, "gradwatch test CA", ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = issue("localhost", server_key, "gradwatch test CA", ca_key,
                        usage=ExtendedKeyUsageOID.SERVER_AUTH,
                        san=[x509.DNSName("localhost"),
                             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = issue(client_name, client_key, "gradwatch test CA", ca_key,
                        usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    return Certificates(
        ca=write(folder / "ca.pem", ca_cert),
        server_cert=write(folder / "server.pem", server_cert),
        server_key=write(folder / "server-key.pem", server_key),
        client_cert=write(folder / "client.pem", client_cert),
        client_key=write(folder / "client-key.pem", client_key),
    )


class TcpProxy:
    """A loopback TCP forwarder standing in for a stable Service address (what
    kube-proxy gives a Kubernetes Service) in front of a collector that moves.

    `retarget` points it at another backend and cuts the open connections (as
    when a pod dies); `blackhole_responses` makes the open connections swallow
    whatever the backend sends (acks lost in the network); `blackhole` swallows
    both ways without closing anything (the client's host vanished). ``delay_s``
    holds back every chunk, each way, that long (a slow link: the round trip
    grows by twice that). Runs its own thread.
    """

    def __init__(self, target: str, delay_s: float = 0.0) -> None:
        self.target = target
        self.delay_s = delay_s
        self._connections: list[dict] = []
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        started.wait(10)
        self.address = f"127.0.0.1:{self._port}"

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0))
        self._port = self._server.sockets[0].getsockname()[1]
        started.set()
        self._loop.run_forever()

    async def _handle(self, client_reader, client_writer) -> None:
        host, _, port = self.target.rpartition(":")
        try:
            backend_reader, backend_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            client_writer.close()
            return
        connection = {"writers": (client_writer, backend_writer),
                      "blackhole": {"requests": False, "responses": False}}
        self._connections.append(connection)

        async def pump(reader, writer, direction: str) -> None:
            loop = asyncio.get_running_loop()
            chunks: asyncio.Queue = asyncio.Queue()  # (due time, bytes), None at the end

            async def deliver() -> None:
                while (chunk := await chunks.get()) is not None:
                    await asyncio.sleep(chunk[0] - loop.time())
                    writer.write(chunk[1])
                    await writer.drain()

            delivering = asyncio.ensure_future(deliver())
            try:
                while data := await reader.read(65536):
                    if not connection["blackhole"][direction]:
                        chunks.put_nowait((loop.time() + self.delay_s, data))
                chunks.put_nowait(None)
                await delivering
            except OSError:
                pass
            finally:
                delivering.cancel()
                for w in connection["writers"]:
                    w.close()

        await asyncio.gather(pump(client_reader, backend_writer, "requests"),
                             pump(backend_reader, client_writer, "responses"))
        self._connections.remove(connection)

    def _on_loop(self, action: Callable[[], None]) -> None:
        done = threading.Event()

        def run() -> None:
            action()
            done.set()

        self._loop.call_soon_threadsafe(run)
        done.wait(5)

    def retarget(self, target: str) -> None:
        def action() -> None:
            self.target = target
            for connection in self._connections:
                for writer in connection["writers"]:
                    writer.close()

        self._on_loop(action)

    def blackhole_responses(self) -> None:
        self._blackhole("responses")

    def blackhole(self) -> None:
        self._blackhole("requests", "responses")

    def _blackhole(self, *directions: str) -> None:
        def action() -> None:
            for connection in self._connections:
                connection["blackhole"].update(dict.fromkeys(directions, True))

        self._on_loop(action)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        async def shutdown() -> None:
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        self._thread.join(5)
