"""A bounded recent history per job x optimizer, for the web UI's gradient-flow heat map.

`History` keeps the last `STEPS` steps of every variable as one float16 cell each:
``log10`` of the gradient norm, combined over the group's tasks and replicas (the max,
or for shards the norm of them together), or a sentinel: `MISSING` (some task or replica
had no gradient), `NONFINITE` (NaN or Inf somewhere), `NO_DATA` (nobody reported that
step yet). A cell is 2 bytes: 256 bytes per variable per group, 0.26 MB for 1,000
variables (docs/limits.md). Rows are slots ``step % STEPS``; a slot reused by a newer
step starts afresh, and older steps are refused, unless the session's counter was set
back (`History.rewind`). Per session it also keeps the global norm of each replica at the
same steps. Event loop only.

Inside, the cells are kept in an order where combining two reports is their maximum
(no data < any norm < missing < non-finite: `_EMPTY`, ``log10`` norms, `_MISSING`,
`_NONFINITE`), so a batch costs a few array operations; `History.window` gives them in
the encoding above.
"""

from __future__ import annotations

import numpy as np

STEPS = 128
NO_DATA = np.float16(np.inf)
MISSING = np.float16(-np.inf)
NONFINITE = np.float16(np.nan)
#: A global norm no replica reported (norms are never negative; a NaN one is reported).
NO_REPORT = np.float32(-1)
#: log10 of a zero norm (float16 holds down to -65504; norms below 1e-30 read as this).
ZERO = -30.0

# The ordered encoding kept inside (log10 of a float32 norm is at most 38.6).
_EMPTY = np.float16(-np.inf)
_MISSING = np.float16(np.finfo(np.float16).max)
_NONFINITE = np.float16(np.inf)


def _encode(present: np.ndarray, norms: np.ndarray, nonfinite: np.ndarray) -> np.ndarray:
    """Ordered float16 cells of ``[..., variables]`` arrays."""
    with np.errstate(divide="ignore", invalid="ignore"):
        cells = np.log10(np.maximum(norms, np.float32(1e-30))).astype(np.float16)
    cells[~present] = _MISSING
    cells[nonfinite] = _NONFINITE
    return cells


def _combine_shards(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Ordered cells of two shards of the same steps: a sentinel by its order, else the
    norm of both together (one not reported yet takes the other)."""
    high, low = np.maximum(a, b), np.minimum(a, b)
    together = (high >= _MISSING) | (low == _EMPTY)
    high64, low64 = high.astype(np.float64), low.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        merged = (high64 + 0.5 * np.log10(1 + 10 ** (2 * (low64 - high64)))).astype(np.float16)
    return np.where(together, high, merged)


def _decode(cells: np.ndarray) -> np.ndarray:
    """The public encoding (see the module) of ordered cells."""
    out = cells.copy()
    out[cells == _EMPTY] = NO_DATA
    out[cells == _MISSING] = MISSING
    out[cells == _NONFINITE] = NONFINITE
    return out


class History:
    """The recent steps of one group; `columns` grows with the group's variables."""

    def __init__(self, sharded: bool = False) -> None:
        self.sharded = sharded
        self.steps = np.full(STEPS, -1, np.int64)  # the step each slot holds (-1: none)
        self.cells = np.full((STEPS, 0), _EMPTY, np.float16)  # ordered
        #: Per session id: global norm per slot and replica (float32; NaN or Inf as
        #: reported, `NO_REPORT` where none).
        self.global_norms: dict[str, np.ndarray] = {}
        #: Sharded: per slot, the sessions whose report of its step is in its cells, so a
        #: shard's repeat is not added again (two equal shards are).
        self.reported_by: list[set[str]] = [set() for _ in range(STEPS)]

    @property
    def nbytes(self) -> int:
        return self.cells.nbytes + sum(g.nbytes for g in self.global_norms.values())

    def add(self, session_id: str, columns: np.ndarray | slice, steps: np.ndarray,
            present: np.ndarray, norms: np.ndarray, nonfinite: np.ndarray,
            global_norm: np.ndarray, width: int) -> None:
        """One batch of a session: ``[S, R, N]`` arrays, ``columns`` its group columns
        (`SessionState.column_index`: an array or a slice), ``global_norm`` ``[S, R]``,
        ``width`` the group's column count."""
        if self.cells.shape[1] < width:
            grown = np.full((STEPS, width), _EMPTY, np.float16)
            grown[:, :self.cells.shape[1]] = self.cells
            self.cells = grown
        # The max over replicas: any replica's missing or non-finite gradient wins.
        cells = _encode(present, norms, nonfinite).max(axis=1)
        replicas = global_norm.shape[1]
        history = self.global_norms.get(session_id)
        if history is None or history.shape[1] != replicas:
            history = self.global_norms[session_id] = np.full((STEPS, replicas), NO_REPORT,
                                                              np.float32)
        slots = steps % STEPS
        keep = steps >= self.steps[slots]  # older than what their slots hold: refused
        slots, steps, cells, global_norm = slots[keep], steps[keep], cells[keep], global_norm[keep]
        newer = steps > self.steps[slots]  # their slots' old steps leave the window
        if newer.any():
            fresh = slots[newer]
            self.steps[fresh] = steps[newer]
            self.cells[fresh] = _EMPTY
            for other in self.global_norms.values():
                other[fresh] = NO_REPORT
            if self.sharded:
                for slot in fresh.tolist():
                    self.reported_by[slot].clear()
        history[slots] = global_norm
        if self.sharded:  # (the max of replicas is the same for a repeat: no bookkeeping)
            first = np.array([session_id not in self.reported_by[slot] for slot in slots.tolist()],
                             bool)
            slots, cells = slots[first], cells[first]
            for slot in slots.tolist():
                self.reported_by[slot].add(session_id)
        rows = (slots, columns) if isinstance(columns, slice) else np.ix_(slots, columns)
        held = self.cells[rows]
        self.cells[rows] = (_combine_shards(held, cells) if self.sharded
                            else np.maximum(held, cells))

    def rewind(self, session_id: str, step: int) -> None:
        """The session's step counter was set back to ``step`` (a checkpoint restored): the
        held steps from ``step`` on that it reported, or that no session still known did,
        leave the window, so the new steps are drawn. Another task's reports of them stay
        until its counter is set back too (so its new steps are not cleared then)."""
        reported = {sid: (g != NO_REPORT).any(axis=1) for sid, g in self.global_norms.items()}
        anyone = np.logical_or.reduce([*reported.values(), np.zeros(STEPS, bool)])
        stale = (self.steps >= step) & (reported.get(session_id, False) | ~anyone)
        self.steps[stale] = -1
        self.cells[stale] = _EMPTY
        for norms in self.global_norms.values():
            norms[stale] = NO_REPORT
        for slot in np.flatnonzero(stale).tolist():
            self.reported_by[slot].clear()

    def window(self) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """(steps, cells ``[steps, columns]``, global norms per session) of the held steps,
        oldest first."""
        order = np.argsort(self.steps, kind="stable")
        order = order[self.steps[order] >= 0]
        return (self.steps[order], _decode(self.cells[order]),
                {sid: g[order] for sid, g in self.global_norms.items()})

    def keep_columns(self, kept: np.ndarray) -> None:
        """Keeps the columns where ``kept`` (bool, over the group's columns) is True."""
        self.cells = self.cells[:, kept[:self.cells.shape[1]]]

    def forget(self, session_id: str) -> None:
        self.global_norms.pop(session_id, None)

    def hand_over(self, old_id: str, new_id: str) -> None:
        """Session ``new_id`` continues ``old_id`` (the same task, more variables): the
        steps ``old_id`` reported stay its own, the global norms included."""
        norms = self.global_norms.pop(old_id, None)
        if norms is not None:
            self.global_norms[new_id] = norms
        for reporters in self.reported_by:
            if old_id in reporters:
                reporters.discard(old_id)
                reporters.add(new_id)
