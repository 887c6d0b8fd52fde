"""Diagnose-only mode for TensorFlow: explain missing gradients without a collector.

In a notebook::

    from gradwatch.agent import diagnose_missing_gradients
    with diagnose_missing_gradients() as report:
        model.fit(x, y, epochs=1)
    print(report)

From a shell, ``gradwatch doctor train.py [ARGS...]`` runs the script's training under
the same watch and prints the report (`gradwatch.agent.core.doctor.run_script`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from gradwatch.agent.core.doctor import Report
from gradwatch.agent.tensorflow import tape


@contextlib.contextmanager
def diagnose_missing_gradients() -> Iterator[Report]:
    """Watches every ``tf.GradientTape.gradient`` call (``model.fit`` included) inside the
    block and collects why variables get no gradient; eager steps are recorded from the
    start, so the first step is explained (slower than training normally)."""
    report = Report()
    calls = tape.gradient_calls()
    stop = tape.listen(report.add, record_eagerly=True, tells=False)  # (the report tells)
    try:
        yield report
    finally:
        stop()
        report.seen += tape.gradient_calls() - calls
