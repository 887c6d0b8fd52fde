"""The collector's web UI and its JSON API, on the metrics HTTP port.

- ``/``: the collector (version, uptime, ingest rate, streams, limits, sinks) and every
  job, broken ones first;
- ``/jobs/{training_job}``: its alerts, why gradients are missing, the gradient-flow heat
  map (``/jobs/{training_job}/heatmap.png``), global norms per task and replica, and a
  sortable table of variables;
- ``/api/v1/jobs``, ``/api/v1/jobs/{training_job}`` and
  ``/api/v1/jobs/{training_job}/heatmap``: the same data as JSON (docs/web.md).

Server-rendered HTML, with a small script for the heat map's hover and the table's
sorting (``collector/static``; no build chain, nothing from a CDN). Every job, variable,
op and file name is user input: all of it is escaped, in HTML and in the JSON embedded
for the script. Served behind the same web config (TLS, basic auth) as ``/metrics``.
Event loop only.
"""

from __future__ import annotations

import base64
import collections
import html
import json
import math
import time
from importlib import resources
from urllib.parse import quote

import numpy as np
from aiohttp import web

from gradwatch import __version__
from gradwatch.collector import heatmap, jobs
from gradwatch.collector.alerts import AlertTracker
from gradwatch.collector.ingest import Limits
from gradwatch.collector.sinks import Dispatcher
from gradwatch.collector.state import Registry
from gradwatch.collector.telemetry import Telemetry

#: Variables per page of the heat map and the variable table.
PAGE = 500
_STATIC = {name: resources.files("gradwatch.collector").joinpath("static", name).read_bytes()
           for name in ("ui.css", "ui.js", "favicon.svg")}
# The heat map's own colours, defined once (collector/heatmap.py), for the legend.
_STATIC["ui.css"] += (f".swatch.missing {{ background: {heatmap.MISSING_COLOUR}; }}\n"
                      f".swatch.nonfinite {{ background: {heatmap.NONFINITE_COLOUR}; }}\n"
                      f".swatch.no-data {{ background: {heatmap.NO_DATA_COLOUR}; }}\n").encode()
_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _path(job: str) -> str:
    return "/jobs/" + quote(job, safe="")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _query_int(request: web.Request, name: str, default: int) -> int:
    """An integer query parameter (absent or empty: ``default``); else 400."""
    value = request.query.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} is an integer\n") from None


def _number(value: float | str | None) -> str:
    if value is None:
        return "—"
    return value if isinstance(value, str) else f"{value:.3g}"


def _json_for_script(data: object) -> str:
    """JSON safe inside <script>: no '<' can close the element."""
    return json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e").replace(
        "&", "\\u0026")


class IngestRate:
    """Step reports and statistics per second over the last minute, sampled by a timer."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self.samples: collections.deque[tuple[float, int, int]] = collections.deque(maxlen=13)
        self.sample()

    def sample(self) -> None:
        t = self.telemetry
        self.samples.append((time.monotonic(), t.step_reports, t.variable_statistics))

    def per_second(self) -> tuple[float, float]:
        (t0, s0, v0), (t1, s1, v1) = self.samples[0], self.samples[-1]
        elapsed = t1 - t0
        return ((s1 - s0) / elapsed, (v1 - v0) / elapsed) if elapsed > 0 else (0.0, 0.0)


class WebUI:
    """Routes and pages over the collector's state (all read on the event loop)."""

    def __init__(self, registry: Registry, telemetry: Telemetry, tracker: AlertTracker,
                 dispatcher: Dispatcher, limits: Limits, open_streams) -> None:
        self.registry = registry
        self.telemetry = telemetry
        self.tracker = tracker
        self.dispatcher = dispatcher
        self.limits = limits
        self.open_streams = open_streams
        self.started = time.time()
        self.rate = IngestRate(telemetry)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self.index)
        app.router.add_get("/jobs/{job}", self.job)
        app.router.add_get("/jobs/{job}/heatmap.png", self.heatmap_png)
        app.router.add_get("/static/{name}", self.static)
        app.router.add_get("/api/v1/jobs", self.api_jobs)
        app.router.add_get("/api/v1/jobs/{job}", self.api_job)
        app.router.add_get("/api/v1/jobs/{job}/heatmap", self.api_heatmap)

    # -- JSON ----------------------------------------------------------------------------

    async def api_jobs(self, request: web.Request) -> web.Response:
        return web.json_response({"jobs": jobs.summaries(self.registry, self.tracker)})

    async def api_job(self, request: web.Request) -> web.Response:
        found = jobs.detail(self.registry, self.tracker, request.match_info["job"])
        if found is None:
            raise web.HTTPNotFound(text="unknown training job\n")
        return web.json_response(found)

    async def api_heatmap(self, request: web.Request) -> web.Response:
        group, offset, limit = self._heatmap_request(request)
        steps, cells, _ = group.history.window()
        rows = cells[:, offset:offset + limit]

        def cell(value: float) -> object:
            if value != value:
                return "nonfinite"
            if value == float(heatmap.MISSING):
                return "missing"
            return None if value == float(heatmap.NO_DATA) else round(float(value), 3)

        return web.json_response({
            "optimizer": group.optimizer, "steps": steps.tolist(),
            "variables": group.names[offset:offset + limit], "offset": offset,
            "total_variables": len(group.names),
            "log10_norm": [[cell(v) for v in column] for column in rows.T.tolist()]})

    # -- pages ---------------------------------------------------------------------------

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _STATIC:
            raise web.HTTPNotFound()
        kind = _TYPES[name[name.rindex("."):]]
        return web.Response(body=_STATIC[name], content_type=kind,
                            headers={"Cache-Control": "max-age=300"})

    def _page(self, title: str, body: str) -> web.Response:
        text = (f"<!doctype html><html lang=en><head><meta charset=utf-8>"
                f"<meta name=viewport content='width=device-width, initial-scale=1'>"
                f"<title>{_e(title)} · gradwatch</title>"
                f"<link rel=icon href='/static/favicon.svg'>"
                f"<link rel=stylesheet href='/static/ui.css'></head><body>"
                f"<header><a href='/'>gradwatch</a> <span>collector {_e(__version__)}</span>"
                f"<nav><a href='/'>jobs</a> <a href='/metrics'>/metrics</a> "
                f"<a href='/api/v1/jobs'>API</a></nav></header><main>{body}</main>"
                f"<script src='/static/ui.js'></script></body></html>")
        return web.Response(text=text, content_type="text/html",
                            headers={"Content-Security-Policy": "default-src 'self'; "
                                     "img-src 'self' data:; object-src 'none'"})

    async def index(self, request: web.Request) -> web.Response:
        reports, statistics = self.rate.per_second()
        rows = []
        for job in jobs.summaries(self.registry, self.tracker):
            broken = job["firing_alerts"] or job["variables_without_gradient"] or \
                job["nonfinite_steps"]
            alerts = ", ".join(job["firing_alerts"]) or "—"
            rows.append(
                f"<tr class='{'broken' if broken else ''}'>"
                f"<td class=name><a href='{_e(_path(job['training_job']))}'>"
                f"{_e(job['training_job'])}</a>"
                f"{' <small>finished</small>' if job['finished'] else ''}</td>"
                f"<td class=num>{job['tasks']} &times; {job['replicas']}</td>"
                f"<td>{_e(', '.join(job['optimizers']))}</td>"
                f"<td class=num>{job['last_step']}</td>"
                f"<td class=num>{job['steps_per_second']:.2f}</td>"
                f"<td class=num>{_age(job['last_report_age_seconds'])}</td>"
                f"<td class=num>{job['variables_without_gradient']} / {job['variables']}</td>"
                f"<td class=num>{job['nonfinite_steps']}</td><td>{_e(alerts)}</td></tr>")
        sinks = []
        for name, state in self.dispatcher.states.items():
            sent = self.dispatcher.outcomes[(name, "sent")]
            failed = self.dispatcher.outcomes[(name, "failed")]
            dropped = self.dispatcher.outcomes[(name, "dropped")]
            last_ok = _age(time.time() - state.last_success) + " ago" \
                if state.last_success else "never"
            last_bad = (f"{_age(time.time() - state.last_failure)} ago: {_e(state.last_error)}"
                        if state.last_failure else "—")
            sinks.append(f"<tr><td class=name>{_e(name)}</td><td class=num>{sent}</td>"
                         f"<td class=num>{failed}</td><td class=num>{dropped}</td>"
                         f"<td>{last_ok}</td><td>{last_bad}</td></tr>")
        limits = "".join(f"<tr><td>{_e(k)}</td><td class=num>{v:,}</td></tr>"
                         for k, v in vars(self.limits).items())
        body = (
            "<h1>Training jobs</h1>"
            "<table class=jobs><thead><tr><th>training job</th><th>tasks &times; replicas</th>"
            "<th>optimizers</th><th>last step</th><th>steps/s</th><th>last report</th>"
            "<th>without gradient</th><th>non-finite steps</th><th>firing alerts</th></tr>"
            f"</thead><tbody>{''.join(rows) or '<tr><td colspan=9>no job has reported'}"
            "</tbody></table>"
            "<h2>Collector</h2><dl class=facts>"
            f"<dt>version</dt><dd>{_e(__version__)}</dd>"
            f"<dt>uptime</dt><dd>{_age(time.time() - self.started)}</dd>"
            f"<dt>ingest</dt><dd>{reports:,.1f} step reports/s, {statistics:,.0f} "
            "statistics/s (last minute)</dd>"
            f"<dt>open report streams</dt><dd>{self.open_streams()}</dd>"
            f"<dt>sessions</dt><dd>{len(self.registry.sessions)}</dd></dl>"
            "<h2>Alert delivery</h2><table><thead><tr><th>sink</th><th>sent</th>"
            "<th>failed</th><th>dropped</th><th>last success</th><th>last failure</th></tr>"
            f"</thead><tbody>{''.join(sinks)}</tbody></table>"
            f"<h2>Limits</h2><table class=limits><tbody>{limits}</tbody></table>")
        return self._page("jobs", body)

    async def job(self, request: web.Request) -> web.Response:
        name = request.match_info["job"]
        found = jobs.detail(self.registry, self.tracker, name)
        if found is None:
            raise web.HTTPNotFound(text="unknown training job\n")
        offset = max(0, _query_int(request, "offset", 0))
        parts = [f"<h1>{_e(name)}</h1><p class=summary>{found['tasks']} tasks &times; "
                 f"{found['replicas']} replicas · last step {found['last_step']} · "
                 f"{found['steps_per_second']:.2f} steps/s · last report "
                 f"{_age(found['last_report_age_seconds'])} ago · "
                 f"<a href='/api/v1/jobs/{_e(quote(name, safe=''))}'>JSON</a></p>",
                 self._alerts_html(found["alerts"])]
        for group in found["groups"]:
            parts.append(self._group_html(name, group, offset))
        return self._page(name, "".join(parts))

    def _alerts_html(self, alerts: dict) -> str:
        def item(alert: dict) -> str:
            notes = alert["annotations"]
            runbook = notes.get("runbook_url", "")
            # The default, a path in gradwatch's repository, is named, not linked (relative
            # to this page it leads nowhere); set runbook_url to a URL to get a link.
            link = (f" <a href='{_e(runbook)}'>runbook</a>"
                    if runbook.startswith(("http://", "https://")) else
                    f" <small>runbook: {_e(runbook)}</small>" if runbook else "")
            when = (f"since {_age(time.time() - alert['starts_at'])}" if alert["ends_at"] is None
                    else f"resolved {_age(time.time() - alert['ends_at'])} ago")
            return (f"<li class='alert {_e(alert['status'])} {_e(alert['severity'])}'>"
                    f"<b>{_e(alert['alertname'])}</b> <small>{_e(alert['severity'])} · "
                    f"{_e(alert['optimizer'])} · {when}</small>{link}"
                    f"<div>{_e(notes.get('summary', ''))}</div>"
                    f"<details><summary>description</summary>"
                    f"<p>{_e(notes.get('description', ''))}</p></details></li>")

        firing = "".join(item(a) for a in alerts["firing"]) or "<li>none</li>"
        resolved = "".join(item(a) for a in alerts["resolved"][:20]) or "<li>none</li>"
        return (f"<h2>Firing alerts</h2><ul class=alerts>{firing}</ul>"
                f"<h2>Recently resolved</h2><ul class='alerts resolved'>{resolved}</ul>")

    def _group_html(self, job: str, group: dict, offset: int) -> str:
        optimizer = group["optimizer"]

        def names(variables: list[str]) -> str:
            return _e(", ".join(variables[:20])) + (" …" if len(variables) > 20 else "")

        causes = "".join(
            f"<li><b>{names(c['variables'])}</b>"
            f"<div class=cause data-cause='{_e(c['cause'])}'>{_e(c['explanation'])}</div>"
            f"<small>cause {_e(c['cause'])}{' · op ' + _e(c['op']) if c['op'] else ''}"
            f"{' · ' + _e(c['source']) if c['source'] else ''}</small></li>"
            for c in group["causes"])
        undiagnosed = [v["name"] for v in group["variables"]
                       if v["present"] is False and not v["cause"]]
        if undiagnosed:
            causes += (f"<li><b>{names(undiagnosed)}</b><div class=cause data-cause=''>no "
                       "gradient at the latest step; not diagnosed (the agent's diagnosis is "
                       "off, or has not found the cause yet: docs/diagnosis.md)</div></li>")
        causes = causes or "<li>every variable gets a gradient</li>"
        return (f"<section class=optimizer><h2>Optimizer {_e(optimizer)}"
                f"{' <small>(sharded)</small>' if group['sharded'] else ''}</h2>"
                f"<h3>Why gradients are missing</h3><ul class=causes>{causes}</ul>"
                + self._heatmap_html(job, optimizer, group, offset)
                + self._global_norm_svg(group["global_norm"])
                + self._variables_html(group["variables"], offset) + "</section>")

    def _heatmap_html(self, job: str, optimizer: str, group: dict, offset: int) -> str:
        names = [v["name"] for v in group["variables"]]
        steps = group["steps"]
        if not steps:
            return "<h3>Gradient flow</h3><p>no step reported yet</p>"
        page = names[offset:offset + PAGE]
        url = (f"{_path(job)}/heatmap.png?optimizer={quote(optimizer, safe='')}"
               f"&offset={offset}&limit={PAGE}")
        cells = self._group(job, optimizer).history.window()[1][:, offset:offset + PAGE]
        low, high = heatmap.value_range(cells)
        width, height = self._cell_size(len(page), len(steps))
        data = {"names": page, "steps": steps, "cellWidth": width, "cellHeight": height,
                "cells": base64.b64encode(cells.T.astype("<f2").tobytes()).decode()}
        pages = ""
        if len(names) > PAGE:
            links = [f"<a href='{_e(_path(job))}?offset={o}'"
                     f"{' class=current' if o == offset else ''}>{o + 1}&ndash;"
                     f"{min(o + PAGE, len(names))}</a>" for o in range(0, len(names), PAGE)]
            pages = f"<p class=pages>variables {' '.join(links)} of {len(names)}</p>"
        legend = (f"<div class=legend><span class=scale></span> log10 norm "
                  f"{low:.1f} … {high:.1f} <i class='swatch missing'></i> missing "
                  "<i class='swatch nonfinite'></i> NaN/Inf "
                  "<i class='swatch no-data'></i> not reported</div>")
        marks = list(dict.fromkeys((steps[0], steps[len(steps) // 2], steps[-1])))
        axis = "<div class=axis>" + "".join(
            f"<span>{'step ' if i == 0 else ''}{m}</span>" for i, m in enumerate(marks)) + "</div>"
        labels = ""
        if height >= 10:  # room for a name per row
            labels = ("<ol class='rows h" + str(height) + "'>"
                      + "".join(f"<li>{_e(n)}</li>" for n in page) + "</ol>")
        return (f"<h3>Gradient flow</h3>{pages}{legend}<div class=heatrow>{labels}"
                f"<figure class=heat><div class=heatmap>"
                f"<img src='{_e(url)}' width={width * len(steps)} "
                f"height={height * len(page)} alt='gradient norms by variable and step'>"
                f"<div class=tip hidden></div>"
                f"<script type=application/json>{_json_for_script(data)}</script></div>{axis}"
                "</figure></div>")

    @staticmethod
    def _cell_size(rows: int, steps: int) -> tuple[int, int]:
        """Pixels per cell: the map stays within about 720 x 700 pixels (rows beyond that
        get 3 pixels each, and the page scrolls)."""
        return max(4, min(24, 720 // max(steps, 1))), max(3, min(14, 700 // max(rows, 1)))

    def _global_norm_svg(self, series: list[dict]) -> str:
        def drawn(points: list) -> list:  # finite, positive norms
            return [p for p in points if isinstance(p[1], float) and p[1] > 0]

        everything = [p for s in series for p in s["points"]]
        points = [p for s in series for p in drawn(s["points"])]
        if not everything:
            return ""
        steps = [p[0] for p in everything]
        logs = [math.log10(p[1]) for p in points] or [0.0]
        x0, x1 = min(steps), max(steps) or 1
        y0, y1 = min(logs), max(logs)
        if y1 - y0 < 1e-6:
            y0, y1 = y0 - 0.5, y1 + 0.5
        w, h = 720, 180
        # A NaN or Inf global norm: a red line across the chart at its step.
        lines = [f"<line class=nonfinite x1={x:.1f} y1=0 x2={x:.1f} y2={h} stroke='#d62728'>"
                 f"<title>{_e(str(value))} at step {step}</title></line>"
                 for step, value in sorted({(p[0], p[1]) for p in everything
                                            if isinstance(p[1], str)})
                 for x in [(step - x0) / max(x1 - x0, 1) * w]]
        palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
        for k, s in enumerate(series):
            coords = " ".join(
                f"{(p[0] - x0) / max(x1 - x0, 1) * w:.1f},"
                f"{h - (math.log10(p[1]) - y0) / (y1 - y0) * h:.1f}"
                for p in drawn(s["points"]))
            if coords:
                lines.append(f"<polyline points='{coords}' stroke='{palette[k % 6]}'>"
                             f"<title>{_e(s['task'])} replica {s['replica']}</title>"
                             "</polyline>")
        return (f"<h3>Global gradient norm per task and replica</h3><figure class=heat>"
                f"<svg class=chart viewBox='0 0 {w} {h}' width={w} height={h} role=img>"
                f"{''.join(lines)}</svg><div class=axis><span>step {x0}</span>"
                f"<span>log10 norm {y0:.2f} … {y1:.2f}</span><span>{x1}</span></div></figure>")

    def _variables_html(self, variables: list[dict], offset: int) -> str:
        def row(v: dict) -> str:
            present = "—" if v["present"] is None else "yes" if v["present"] else "no"
            norm = v["norm"] if isinstance(v["norm"], float) else -1
            return (f"<tr class='{'missing' if v['present'] is False else ''}'>"
                    f"<td class=name>{_e(v['name'])}</td><td class=num data-value='{norm}'>"
                    f"{_number(v['norm'])}</td><td>{present}</td>"
                    f"<td class=num>{v['nan_values']:.0f}</td>"
                    f"<td class=num>{v['inf_values']:.0f}</td>"
                    f"<td class=num>{v['missing_steps']:.0f}</td><td>{_e(v['cause'])}</td></tr>")

        rows = "".join(row(v) for v in variables[offset:offset + PAGE])
        return ("<h3>Variables</h3><table class=sortable><thead><tr><th>variable</th>"
                "<th>norm</th><th>present</th><th>NaN</th><th>Inf</th><th>missing steps</th>"
                f"<th>cause</th></tr></thead><tbody>{rows}</tbody></table>")

    def _group(self, job: str, optimizer: str):
        """The job's group of ``optimizer``; "" names a job's only optimizer. 404 for an
        unknown job, 400 when no optimizer or an unknown one is named, listing the job's."""
        group = self.registry.groups.get((job, optimizer))
        if group is not None:
            return group
        optimizers = sorted(o for j, o in list(self.registry.groups) if j == job)
        if not optimizers:
            raise web.HTTPNotFound(text="unknown training job\n")
        if not optimizer and len(optimizers) == 1:
            return self.registry.groups[(job, optimizers[0])]
        said = f"unknown optimizer {optimizer!r}" if optimizer else "name an optimizer"
        raise web.HTTPBadRequest(text=f"{said}: optimizer= one of {', '.join(optimizers)}\n")

    def _heatmap_request(self, request: web.Request):
        job = request.match_info["job"]
        optimizer = request.query.get("optimizer", "")
        offset = max(0, _query_int(request, "offset", 0))
        limit = min(PAGE * 4, max(1, _query_int(request, "limit", PAGE)))
        return self._group(job, optimizer), offset, limit

    async def heatmap_png(self, request: web.Request) -> web.Response:
        group, offset, limit = self._heatmap_request(request)
        cells = group.history.window()[1][:, offset:offset + limit]
        if cells.size == 0:
            cells = np.full((1, max(1, min(limit, len(group.names) - offset))),
                            heatmap.NO_DATA, np.float16)
        width, height = self._cell_size(cells.shape[1], cells.shape[0])
        low, high = heatmap.value_range(cells)
        return web.Response(body=heatmap.render(cells, width, height, low, high),
                            content_type="image/png", headers={"Cache-Control": "no-store"})
