"""When the sender reads a session's step buffer: soon after each step, not in between.

A read of a device buffer costs the sender thread a device round trip (an eager
TensorFlow op: 0.5-1 ms of CPU when it runs once per flush interval), and most reads
find nothing when steps take longer than the flush interval. `ReadPace` learns the
step period from the reads that found steps and skips the reads that would not.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

#: Per-step periods remembered; the shortest of them sets the wait.
PERIODS_KEPT = 8
#: The longest that reads are skipped after the last one that found steps: what a step
#: that ends sooner than expected may be read late by, and how long a ring buffer of
#: ``capacity`` rows must hold steps that suddenly come faster (16 rows: 26 steps/s).
MAX_WAIT_S = 0.5


class ReadPace:
    """Whether a session is due for a read (sender thread only).

    A read that finds ``n`` steps ``t`` seconds after the previous read that found any
    notes a period of ``t / n``. After a read that found steps, reads are skipped until
    the shortest of the last `PERIODS_KEPT` periods, less two flush intervals, has
    passed (at most `MAX_WAIT_S`). Steps that keep their pace are still read within a
    flush interval of their end; with 0.7 s steps and a 0.1 s flush interval a session
    is read 3 times a step instead of 7. A step that ends sooner than any of those
    periods is read up to that wait late, and its period is noted.
    """

    def __init__(self, flush_interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.flush_interval_s = flush_interval_s
        self.clock = clock
        self._periods: collections.deque[float] = collections.deque(maxlen=PERIODS_KEPT)
        self._found_at: float | None = None
        self._next_read = 0.0

    def due(self) -> bool:
        return self.clock() >= self._next_read

    def read(self, steps: int) -> None:
        """Notes a read (when it was `due`) that found ``steps`` new steps."""
        if steps <= 0:
            return
        now = self.clock()
        if self._found_at is not None:
            self._periods.append((now - self._found_at) / steps)
        self._found_at = now
        if self._periods:
            wait = min(min(self._periods) - 2 * self.flush_interval_s, MAX_WAIT_S)
            self._next_read = now + wait
