"""A rule engine on collector state built by hand, with a fake clock, for rule tests."""

from __future__ import annotations

import dataclasses

from gradwatch.collector.alerts import AlertTracker
from gradwatch.collector.ingest import Limits, decode_batch
from gradwatch.collector.rules import RULES, RuleEngine, RuleSettings
from gradwatch.collector.state import Registry
from tests.support import wire


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    """A registry, a rule engine with a fake clock, and the notifications it sent."""

    def __init__(self, resolve_after_s: float = 0.0, **overrides: dict) -> None:
        base = {r.name: r.Params() for r in RULES}
        for name, values in overrides.items():
            base[name] = dataclasses.replace(base[name], **values)
        self.clock = Clock()
        self.sent = []
        self.tracker = AlertTracker(self.sent.append, resolve_after_s)
        self.engine = RuleEngine(RuleSettings(base=base), self.tracker, self.clock)
        self.registry = Registry()

    def register(self, task_index=0, replicas=1, names=("a", "b", "c"), sharded=False):
        return self.registry.register("job", "adam", "worker", task_index, replicas, list(names),
                                      sharded=sharded)

    def feed(self, session, *steps, first_step=None, rewound=False):
        """Each step: present (per replica or flat), with optional norm=/nan= arrays;
        ``rewound``: the first is marked so (the step counter set back)."""
        start = session.last_step + 1 if first_step is None else first_step
        reports = []
        for i, step in enumerate(steps):
            present, extra = (step, {}) if not isinstance(step, dict) else (
                step["present"], {k: v for k, v in step.items() if k != "present"})
            reports.append(wire.step(start + i, present, **extra))
        reports[0].rewound = rewound
        batch = wire.batch(session.id, session.last_sequence + 1, *reports)
        decoded = decode_batch(batch, session.num_replicas, session.num_variables, Limits())
        session.apply(batch.sequence, decoded)
        self.engine.on_batch(session, decoded)

    def active(self, name: str | None = None):
        return [a for a in self.tracker.active() if name is None or a.name == name]


def healthy(n=3, norm=1.0):
    return {"present": [1] * n, "norm": [norm] * n}
