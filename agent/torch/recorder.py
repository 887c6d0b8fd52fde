"""A ring of step records in host memory, filled by asynchronous device-to-host copies.

The training thread `write`s each step's record (a tensor on the gradients' device)
into the next row with ``copy_(non_blocking=True)`` — into pinned memory, plus the
slot's CUDA event recorded after it, for a CUDA device; a plain copy for the CPU — and
never waits. The sender
thread's `read_new` takes the rows whose copies have completed (events queried, never
waited on), oldest first. A row is trusted only if the training thread had not yet
started writing the step that reuses its slot when the read finished; others count as
dropped, as do steps overwritten before they were read.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from gradwatch.agent.core.record import RECORD_WIDTH, from_norms, to_statistics
from gradwatch.agent.core.session import RecordedSteps


def row_bytes(num_variables: int, width: int = RECORD_WIDTH) -> int:
    return 4 * width * num_variables


class HostRing:
    """``capacity`` rows of one session's ``[width, N]`` records (one replica: the
    process's own): full records (width 3), or the norms alone (width 1), which the
    reader marks (`gradwatch.agent.core.record.from_norms`)."""

    num_replicas = 1

    def __init__(self, num_variables: int, capacity: int, device: torch.device,
                 width: int = RECORD_WIDTH) -> None:
        self.num_variables = num_variables
        self.capacity = capacity
        self.device = device
        self._asynchronous = device.type == "cuda"
        self._rows = torch.zeros((capacity, width, num_variables),
                                 pin_memory=self._asynchronous)
        self._slots = self._rows.unbind()  # each slot's row as a view, made once
        self._rows_np = self._rows.numpy()
        self._steps = np.zeros(capacity, np.int64)
        self._events: list = [None] * capacity
        self._written = 0  # steps enqueued (training thread only writes it)
        self._read = 0
        self._nothing = RecordedSteps.none(self.num_replicas, num_variables)

    def write(self, record: torch.Tensor, step: int) -> None:
        """Enqueues one step's ``[width, N]`` record (training thread; returns at once)."""
        slot = self._written % self.capacity
        self._slots[slot].copy_(record, non_blocking=self._asynchronous)
        if self._asynchronous:
            event = self._events[slot]
            if event is None:  # one per slot, recorded again when the slot is reused
                event = self._events[slot] = torch.cuda.Event()
            event.record()
        self._steps[slot] = step
        self._written += 1  # last: the row is complete from the host's point of view

    def unread(self) -> int:
        """Steps written and not read yet, overwritten ones included (any thread)."""
        return self._written - self._read

    def read_new(self) -> RecordedSteps:
        """Rows completed since the previous call (sender thread)."""
        written = self._written
        first = max(self._read, written - self.capacity)
        dropped = first - self._read
        ready = first
        while ready < written:
            event = self._events[ready % self.capacity]
            if event is not None and not event.query():
                break  # copies complete in order: the rest are not done either
            ready += 1
        if ready == first:  # most reads: nothing is allocated
            self._read = ready
            return dataclasses.replace(self._nothing, dropped=dropped) if dropped else self._nothing
        seqs = np.arange(first, ready)
        slots = seqs % self.capacity
        rows, steps = self._rows_np[slots].copy(), self._steps[slots].copy()
        intact = seqs + self.capacity > self._written  # their slots not reused meanwhile
        self._read = ready
        rows = rows[intact]
        records = (from_norms(rows[:, 0]) if rows.shape[1] == 1
                   else rows.reshape(len(rows), RECORD_WIDTH * self.num_variables))
        return RecordedSteps(steps[intact],
                             to_statistics(records[:, None, :], self.num_variables),
                             dropped + int((~intact).sum()))
