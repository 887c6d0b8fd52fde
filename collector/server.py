"""Wires the collector together and runs it on one asyncio event loop.

gRPC (grpc.aio, with the standard health service) and HTTP (aiohttp:
``/metrics``, ``/healthz``, the web UI and its API) share the loop, so state needs no
locks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from pathlib import Path

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gradwatch.collector.alerts import AlertTracker
from gradwatch.collector.auth import TokenAuthority
from gradwatch.collector.config import CollectorConfig
from gradwatch.collector.exporter import Exporter, render_metrics
from gradwatch.collector.exposition import CONTENT_TYPE
from gradwatch.collector.rules import RuleEngine
from gradwatch.collector.service import GradientWatchService
from gradwatch.collector.settings import split_host_port
from gradwatch.collector.sinks import AlertmanagerSink, Dispatcher, LogSink, Sink, WebhookSink
from gradwatch.collector.state import Registry
from gradwatch.collector.telemetry import Telemetry
from gradwatch.collector.tls import ServerCertificates
from gradwatch.collector.web import WebUI
from gradwatch.collector.web_config import RELOAD_INTERVAL_S, WebSecurity
from gradwatch.proto.v1 import gradwatch_pb2, gradwatch_pb2_grpc

log = logging.getLogger(__name__)

#: How long a resolution is re-sent to Alertmanager with the firing alerts (as Prometheus
#: re-sends resolved alerts for 15 minutes): one that an Alertmanager restart lost arrives.
RESOLVED_RESEND_S = 15 * 60.0
SERVICE_NAME = gradwatch_pb2.DESCRIPTOR.services_by_name["GradientWatch"].full_name


class Collector:
    """One collector process: state, rules, sinks, gRPC and HTTP endpoints."""

    def __init__(self, config: CollectorConfig) -> None:
        self.config = config
        self.registry = Registry()
        self.telemetry = Telemetry()
        sinks: list[Sink] = [
            LogSink(),
            *(WebhookSink(url) for url in config.webhook_urls),
            *(AlertmanagerSink(url, lease_s=4 * config.resend_interval_seconds)
              for url in config.alertmanager_urls),
        ]
        self.dispatcher = Dispatcher(sinks)
        self.alerts = AlertTracker(self.dispatcher.submit, config.resolve_after_seconds,
                                   update_interval_s=config.resend_interval_seconds)
        self.rules = RuleEngine(config.rules, self.alerts,
                                min_interval_s=config.batch_evaluation_interval_seconds,
                                runbook_url=config.runbook_url,
                                dashboard_base_url=config.dashboard_base_url,
                                call_later=_call_later)
        tokens = TokenAuthority(config.tokens_file) if config.tokens_file else None
        self.service = GradientWatchService(self.registry, self.rules, self.telemetry,
                                            config.limits, tokens=tokens)
        self.web = WebUI(self.registry, self.telemetry, self.alerts, self.dispatcher,
                         config.limits, lambda: self.service.open_streams)
        self.exporter = Exporter(
            self.registry, self.telemetry, self.alerts.active,
            lambda: dict(self.dispatcher.outcomes), config.max_variable_series)
        self.grpc_port = 0
        self.metrics_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._http: web.AppRunner | None = None
        self.web_security: WebSecurity | None = None
        self._timers: list[asyncio.Task] = []

    async def start(self) -> None:
        """Binds and serves; raises WebConfigError if the web-config file is invalid and
        OSError if an address cannot be bound."""
        if self.config.web_config_file:
            self.web_security = WebSecurity(self.config.web_config_file)
        self.grpc_port = await self._start_grpc()
        self.metrics_port = await self._start_http()
        self.dispatcher.start()
        self._timers = self._start_timers()
        grpc = _host_port(split_host_port(self.config.grpc_address)[0], self.grpc_port)
        metrics = _host_port(split_host_port(self.config.metrics_address)[0],
                             self.metrics_port)
        scheme = self.web_security.scheme if self.web_security else "http"
        log.info("gradwatch collector serving gRPC on %s, metrics on %s://%s/metrics",
                 grpc, scheme, metrics)
        if self.config.ready_file:
            _write_json(self.config.ready_file, {
                "grpc": grpc, "metrics": metrics, "metrics_scheme": scheme,
                "pid": os.getpid()})

    async def _start_grpc(self) -> int:
        """The agents' gRPC server with the health service; returns the bound port."""
        config = self.config
        self._grpc = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", config.limits.max_message_bytes),
            ("grpc.so_reuseport", 0),
            # Ping agents, so that the stream of one whose host vanished (no FIN) ends within
            # keepalive + timeout (40 s): an open stream keeps its session alive and its task
            # registered. gRPC waits ping_timeout_ms (default 60 s) for any unanswered ping.
            ("grpc.keepalive_time_ms", int(config.grpc_keepalive_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", int(config.grpc_keepalive_timeout_seconds * 1000)),
            ("grpc.http2.ping_timeout_ms", int(config.grpc_keepalive_timeout_seconds * 1000)),
            ("grpc.http2.max_pings_without_data", 0),
        ])
        gradwatch_pb2_grpc.add_GradientWatchServicer_to_server(self.service, self._grpc)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        try:
            if config.grpc_tls_cert_file:
                certificates = ServerCertificates(config.grpc_tls_cert_file,
                                                  config.grpc_tls_key_file,
                                                  config.grpc_tls_client_ca_file)
                port = self._grpc.add_secure_port(config.grpc_address,
                                                  certificates.credentials())
            else:
                port = self._grpc.add_insecure_port(config.grpc_address)
        except RuntimeError:  # grpcio: "Failed to bind to address" (in use, or no such host)
            port = 0
        if not port:
            raise OSError(f"cannot bind gRPC address {config.grpc_address} (--grpc-address; in "
                          "use, or not an address of this host)")
        await self._grpc.start()
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return port

    async def _start_http(self) -> int:
        """``/metrics`` and ``/healthz``, behind the web config if any; returns the port."""
        security = self.web_security
        app = web.Application(middlewares=[security.middleware] if security else [])
        app.router.add_get("/metrics", self._serve_metrics)
        app.router.add_get("/healthz", self._serve_health)
        self.web.add_routes(app)
        self._http = web.AppRunner(app, access_log=None)
        await self._http.setup()
        host, port = split_host_port(self.config.metrics_address)
        site = web.TCPSite(self._http, host, port,
                           ssl_context=security.ssl_context if security else None)
        try:
            await site.start()
        except OSError as error:  # named as the gRPC address is, with the setting
            raise OSError(f"cannot bind metrics address {self.config.metrics_address} "
                          f"(--metrics-address): {error.strerror or error}") from error
        return self._http.addresses[0][1]

    def _start_timers(self) -> list[asyncio.Task]:
        config = self.config
        timers = [
            (config.evaluation_interval_seconds, self._evaluate),
            (config.resend_interval_seconds, self._resend),
            (5.0, self.web.rate.sample),
        ]
        if self.web_security:
            timers.append((RELOAD_INTERVAL_S, self.web_security.reload_if_changed))
        return [asyncio.create_task(self._every(interval, action)) for interval, action in timers]

    @staticmethod
    async def _every(interval_s: float, action) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                action()
            except Exception:  # a timer must survive a bad evaluation
                log.exception("periodic %s failed", action.__name__)

    def _evaluate(self) -> None:
        expired = self.registry.expire_inactive(time.time() - self.config.closed_retention_seconds)
        self.rules.tick([*self.registry.groups.values(), *expired])

    def _resend(self) -> None:
        """Firing alerts, and resolutions of the last `RESOLVED_RESEND_S`, again to the
        sinks that want re-sends (Alertmanager)."""
        for notification in [*self.alerts.firing(),
                             *self.alerts.resolved_within(RESOLVED_RESEND_S)]:
            self.dispatcher.submit(notification, resend=True)

    async def _serve_metrics(self, request: web.Request) -> web.Response:
        body = render_metrics(self.exporter, request.query.getall("name[]", []))
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def _serve_health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def stop(self, grace_s: float = 5.0) -> None:
        """Graceful shutdown, within ``grace_s`` (event loop): gRPC health NOT_SERVING and
        new calls refused (UNAVAILABLE); open Report streams ack what their agents had
        sent, then end with OK; a last rule pass, so that what the last batches showed is
        decided; the alert sinks flushed; the HTTP endpoints (``/metrics``) last."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        self.service.drain()
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if not await self.service.streams_ended(grace_s / 2):
            log.warning("report streams still open after %.1f s; cancelling them", grace_s / 2)
        for timer in self._timers:
            timer.cancel()
        if self._grpc is not None:
            await self._grpc.stop(max(0.0, min(1.0, deadline - loop.time())))
        self.rules.tick(self.registry.groups.values())
        await self.dispatcher.flush(max(0.0, deadline - loop.time()))
        await self.dispatcher.close()
        if self._http is not None:
            await self._http.cleanup()
        log.info("stopped in %.2f s", grace_s - (deadline - loop.time()))


def _call_later(delay_s: float, callback) -> asyncio.TimerHandle:
    """Runs ``callback`` on the running event loop after ``delay_s`` (event loop only)."""
    return asyncio.get_running_loop().call_later(delay_s, callback)


def _write_json(path: str, data: dict) -> None:
    """Writes ``path`` atomically (readers never see half a file)."""
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def _host_port(host: str, port: int) -> str:
    """``HOST:PORT`` as agents and URLs take it (an IPv6 host in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(config: CollectorConfig) -> None:
    """Runs until SIGINT or SIGTERM, then drains streams and flushes sinks."""
    collector = Collector(config)
    # Handlers first: the ready file, written by start(), says signals are handled.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Prometheus and Alertmanager reload their configuration on SIGHUP; this collector
    # does not (it would otherwise die at once, without draining): it says so.
    loop.add_signal_handler(signal.SIGHUP, lambda: log.warning(
        "SIGHUP ignored: the collector does not reload its configuration; restart it (SIGTERM "
        "drains the streams first) to apply changes"))
    try:
        await collector.start()
    except BaseException:  # e.g. a port in use: release what did start, then report
        await collector.stop(grace_s=0)
        raise
    await stop.wait()
    log.info("shutting down")
    await collector.stop(config.shutdown_grace_seconds)
