"""Alert lifecycle: which alerts are active, when they started, when they resolved.

Rules produce the set of alerts active *now* for a scope (a job x optimizer);
`AlertTracker` diffs it against the previous set and emits a `Notification`
for each alert that started or resolved, and for one whose annotations changed
(at most once per ``update_interval_s``: a cause whose text moves must not page
again and again; but at once when its first cause arrives, `UNDIAGNOSED` before).
Labels
identify an alert and never name the collector, so several collectors (and
Prometheus) deduplicate in Alertmanager.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone

Labels = tuple[tuple[str, str], ...]


def _rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Alert:
    """An alert as a rule sees it: identity (labels) and explanation (annotations)."""

    labels: dict[str, str]
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.labels["alertname"]

    @property
    def key(self) -> Labels:
        return tuple(sorted(self.labels.items()))


@dataclass(frozen=True)
class Notification:
    """A state change of one alert, ready for any sink."""

    alert: Alert
    starts_at: float
    ends_at: float | None = None  # set when resolved

    @property
    def status(self) -> str:
        return "firing" if self.ends_at is None else "resolved"

    def to_alertmanager(self, generator_url: str = "", lease_end: float | None = None) -> dict:
        """The alert in Alertmanager API v2 ``postableAlert`` shape. A firing alert gets
        ``endsAt = lease_end`` if given (Alertmanager resolves it then unless re-sent)."""
        body = {
            "labels": dict(self.alert.labels),
            "annotations": dict(self.alert.annotations),
            "startsAt": _rfc3339(self.starts_at),
        }
        ends_at = self.ends_at if self.ends_at is not None else lease_end
        if ends_at is not None:
            body["endsAt"] = _rfc3339(ends_at)
        if generator_url:
            body["generatorURL"] = generator_url
        return body


@dataclass
class _Active:
    alert: Alert
    starts_at: float
    notified_at: float  # when sinks last heard of it
    changed: bool = False  # annotations changed since then
    absent_since: float | None = None  # condition gone, resolution pending


#: How a ``causes`` annotation starts while no cause is known: the first one replacing it
#: is sent at once (it is what the page was missing), not ``update_interval_s`` later.
UNDIAGNOSED = "not diagnosed"


def _first_cause(before: Alert, after: Alert) -> bool:
    return (before.annotations.get("causes", "").startswith(UNDIAGNOSED)
            and not after.annotations.get("causes", UNDIAGNOSED).startswith(UNDIAGNOSED))


class AlertTracker:
    """Tracks active alerts per scope; calls ``notify`` on every change (event loop only).

    Hysteresis: an alert whose condition disappears keeps firing until the condition
    has stayed away for ``resolve_after_s``; if it comes back first, nothing is sent
    (a flapping condition is one long alert, not a stream of pages). Changed
    annotations are sent ``update_interval_s`` after the previous notice at the
    earliest (the latest text then; `expire` sends what is due).
    """

    def __init__(self, notify: Callable[[Notification], None],
                 resolve_after_s: float = 0.0, keep_resolved: int = 200,
                 update_interval_s: float = 0.0) -> None:
        self._notify = notify
        self.resolve_after_s = resolve_after_s
        self.update_interval_s = update_interval_s
        self._active: dict[tuple, dict[Labels, _Active]] = {}
        #: The latest resolutions, newest last (for people to look at).
        self.resolved: collections.deque[Notification] = collections.deque(
            maxlen=keep_resolved)

    def update(self, scope: tuple, alerts: Iterable[Alert], now: float | None = None) -> None:
        now = time.time() if now is None else now
        previous = self._active.get(scope, {})
        current: dict[Labels, _Active] = {}
        for alert in alerts:
            before = previous.get(alert.key)
            if before is None:
                current[alert.key] = _Active(alert, now, notified_at=now)
                self._notify(Notification(alert, now))
            else:
                changed = before.changed or alert.annotations != before.alert.annotations
                current[alert.key] = entry = _Active(alert, before.starts_at,
                                                     before.notified_at, changed)
                self._send_update(entry, now, at_once=_first_cause(before.alert, alert))
        for key, gone in previous.items():
            if key not in current:
                if gone.absent_since is None:
                    gone.absent_since = now
                if now - gone.absent_since >= self.resolve_after_s:
                    self._resolve(Notification(gone.alert, gone.starts_at, ends_at=now))
                else:
                    current[key] = gone
        if current:
            self._active[scope] = current
        else:
            self._active.pop(scope, None)

    def expire(self, now: float | None = None) -> None:
        """Resolves alerts whose condition has been gone for ``resolve_after_s``; sends
        the annotation updates that are due."""
        now = time.time() if now is None else now
        for scope, active in list(self._active.items()):
            for key, entry in list(active.items()):
                if entry.absent_since is None:
                    self._send_update(entry, now)
                elif now - entry.absent_since >= self.resolve_after_s:
                    del active[key]
                    self._resolve(Notification(entry.alert, entry.starts_at, ends_at=now))
            if not active:
                del self._active[scope]

    def _send_update(self, entry: _Active, now: float, at_once: bool = False) -> None:
        if entry.changed and (at_once or now - entry.notified_at >= self.update_interval_s):
            entry.changed, entry.notified_at = False, now
            self._notify(Notification(entry.alert, entry.starts_at))

    def _resolve(self, notification: Notification) -> None:
        self.resolved.append(notification)
        self._notify(notification)

    def active(self) -> list[Alert]:
        return [a.alert for scope in self._active.values() for a in scope.values()]

    def firing(self) -> list[Notification]:
        """A firing notification for every active alert (for periodic re-sends)."""
        return [Notification(a.alert, a.starts_at)
                for scope in self._active.values() for a in scope.values()]

    def resolved_within(self, seconds: float, now: float | None = None) -> list[Notification]:
        """The resolutions of the last ``seconds``, the latest per alert and none of an
        alert firing again (for periodic re-sends: an Alertmanager that restarted when one
        was sent gets it again, as Prometheus re-sends them)."""
        now = time.time() if now is None else now
        firing = {a.alert.key for scope in self._active.values() for a in scope.values()}
        latest = {n.alert.key: n for n in self.resolved
                  if n.ends_at is not None and now - n.ends_at < seconds}
        return [n for key, n in latest.items() if key not in firing]
