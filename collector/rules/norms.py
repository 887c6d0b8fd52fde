"""GradientExploding and GradientVanishing: a variable's (or the whole step's) gradient
norm against its limits and its own history."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from gradwatch.collector.alerts import Alert
from gradwatch.collector.rules.base import Params, Rule, above, alert, flagged, names, reporting
from gradwatch.collector.state import Group, SessionState, StepBatch


@dataclass(frozen=True)
class ExplodingParams(Params):
    max_norm: float = above(1e6, 0)
    median_factor: float = above(100.0, 1)
    window_steps: int = above(100, 0)
    min_steps: int = above(10, 0)


def _medians(window: np.ndarray) -> np.ndarray:
    """Medians along the first axis of a non-empty window of finite norms, by one sort
    (numpy's median partitions: 4-6x slower for 100 steps of 1,000 variables)."""
    ordered = np.sort(window, axis=0)
    k = len(ordered)
    return (ordered[(k - 1) // 2] + ordered[k // 2]) / 2


@dataclass
class NormHistory:
    """A session's recent finite norms (max over replicas) and the latest verdict."""

    global_norms: np.ndarray  # float64 [<= window]
    variable_norms: np.ndarray  # float32 [<= window, N]
    #: The medians over the window (global, per variable), refreshed every quarter window.
    global_median: float = 0.0
    variable_median: np.ndarray = field(default_factory=lambda: np.zeros(0))
    median_age: float = np.inf
    global_exploded: bool = False
    variables_exploded: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    #: The largest finite global norm of the latest batch (NaN ones are
    #: GradientNonFinite's; Python's max() would also drop them silently).
    peak_global: float = 0.0


class GradientExploding(Rule[NormHistory]):
    """A gradient norm (global, or a variable's) above ``max_norm``, or above
    ``median_factor`` x its median over the previous ``window_steps`` steps (once at
    least ``min_steps`` are known; the medians are refreshed every quarter window, which
    a factor of 100 does not notice). Norms are maxima over replicas. A NaN or Inf norm
    is GradientNonFinite's, unless no NaN or Inf element was counted: then the norm of
    finite values overflowed float32 (TensorFlow under XLA on an accelerator)."""

    name = "GradientExploding"
    Params = ExplodingParams

    def new_state(self, session: SessionState) -> NormHistory:
        return NormHistory(np.zeros(0), np.zeros((0, session.num_variables), np.float32),
                           variables_exploded=np.zeros(session.num_variables, bool))

    def observe(self, state: NormHistory, session: SessionState, batch: StepBatch,
                params: ExplodingParams) -> None:
        per_variable = np.where(batch.present, batch.l2_norm, 0).max(axis=1)  # [S, N]
        global_norm = batch.global_norm.max(axis=1)  # [S]
        too_big_g = global_norm > params.max_norm
        too_big_v = (per_variable > params.max_norm).any(axis=0)
        if len(state.global_norms) >= params.min_steps:
            if state.median_age >= max(1, params.window_steps // 4):
                state.global_median = float(_medians(state.global_norms))
                state.variable_median = _medians(state.variable_norms)
                state.median_age = 0
            state.median_age += len(global_norm)
            median_g, median = state.global_median, state.variable_median
            too_big_g |= (global_norm > params.median_factor * median_g) & (median_g > 0)
            too_big_v |= ((per_variable > params.median_factor * median) &
                          (median > 0)).any(axis=0)
        counted = batch.nonfinite.any(axis=1)  # [S, N]
        finite = np.isfinite(global_norm)
        # A step without any gradient has no norm: its 0 is no history (a median of such
        # zeros made the first healthy step after them "100x the median").
        kept = finite & batch.present.any(axis=(1, 2))
        state.global_norms = np.concatenate(
            [state.global_norms, global_norm[kept]])[-params.window_steps:]
        state.variable_norms = np.concatenate(
            [state.variable_norms, per_variable[kept]])[-params.window_steps:]
        state.global_exploded = bool((too_big_g & ~counted.any(axis=1)).any())
        state.variables_exploded = too_big_v & ~counted.any(axis=0)
        if finite.any():
            state.peak_global = float(global_norm[finite].max())

    def evaluate(self, group: Group, states: Mapping[str, NormHistory],
                 params: ExplodingParams, now: float) -> list[Alert]:
        exploded = np.zeros(len(group.names), bool)
        tasks, worst = [], 0.0
        for s in reporting(group):
            state = states.get(s.id)
            if state and (state.global_exploded or state.variables_exploded.any()):
                exploded[s.columns[state.variables_exploded]] = True
                tasks.append(s.task)
                worst = max(worst, state.peak_global)
        if not tasks:
            return []
        return [alert(self.name, "warning", group,
                      f"Gradient norm of {group.training_job} ({group.optimizer}) exploded",
                      f"Largest finite global norm of the latest batch {worst:.4g}; limits: "
                      f"{params.max_norm:g} or "
                      f"{params.median_factor:g}x the median of the last "
                      f"{params.window_steps} steps.", names(group, exploded), tasks)]


@dataclass(frozen=True)
class VanishingParams(Params):
    epsilon: float = 1e-12
    steps: int = above(100, 0)


@dataclass
class Streaks:
    """Consecutive steps each variable's norm stayed at or below epsilon."""

    steps: np.ndarray  # int64 [N]


class GradientVanishing(Rule[Streaks]):
    """A variable's gradient norm at or below ``epsilon`` (default 1e-12: zero in
    practice) on every replica for ``steps`` consecutive steps. Absent gradients don't count
    (that is GradientMissing)."""

    name = "GradientVanishing"
    Params = VanishingParams

    def new_state(self, session: SessionState) -> Streaks:
        return Streaks(np.zeros(session.num_variables, np.int64))

    def observe(self, state: Streaks, session: SessionState, batch: StepBatch,
                params: VanishingParams) -> None:
        small = (batch.present & (batch.l2_norm <= params.epsilon)).all(axis=1)  # [S, N]
        # A streak goes on through a batch of small norms, else it is the batch's last run
        # of them (argmin: the first step from the end that was not small).
        last_run = small[::-1].argmin(axis=0)
        state.steps = np.where(small.all(axis=0), state.steps + len(small), last_run)

    def evaluate(self, group: Group, states: Mapping[str, Streaks], params: VanishingParams,
                 now: float) -> list[Alert]:
        def long_streaks(s: SessionState) -> np.ndarray | None:
            state = states.get(s.id)
            return None if state is None else state.steps >= params.steps

        vanished, tasks = flagged(group, long_streaks)
        if not tasks:
            return []
        return [alert(self.name, "warning", group,
                      f"Gradients of {int(vanished.sum())} variables of "
                      f"{group.training_job} ({group.optimizer}) vanished",
                      f"Norm <= {params.epsilon:g} for {params.steps} consecutive steps.",
                      names(group, vanished), tasks)]
