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


@dataclass
class NormHistory:
    """A session's recent finite norms (max over replicas) and the latest verdict."""

    global_norms: np.ndarray  # float64 [<= window]
    variable_norms: np.ndarray  # float32 [<= window, N]
    #: The per-variable median over the window, refreshed every quarter window.
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
    least ``min_steps`` are known). Norms are maxima over replicas. A NaN or Inf norm
    is GradientNonFinite's, unless no NaN or Inf element was counted: then the norm of
    finite values overflowed float32 (TensorFlow under XLA on an accelerator)."""

    name = "GradientExploding"
    Params = ExplodingParams

    def new_state(self, session: SessionState) -> NormHistory:
        return NormHistory(np.zeros(0), np.zeros((0, session.num_variables), np.float32),
                           variables_exploded=np.zeros(session.num_variables, bool))

    def observe(self, state: NormHistory, session: SessionState, batch: StepBatch,
                params: ExplodingParams) -> None:
        norms = np.where(batch.present, batch.l2_norm, 0.0).astype(np.float64)  # [S, R, N]
        per_variable = norms.max(axis=1)  # [S, N]
        global_norm = batch.global_norm.max(axis=1)  # [S]
        too_big_g = global_norm > params.max_norm
        too_big_v = (per_variable > params.max_norm).any(axis=0)
        if len(state.global_norms) >= params.min_steps:
            median_g = np.median(state.global_norms)
            too_big_g |= (global_norm > params.median_factor * median_g) & (median_g > 0)
            # The per-variable median over the window is the costly part: refreshed when a
            # quarter of the window is new, which a factor of 100 does not notice.
            if state.median_age >= max(1, params.window_steps // 4):
                state.variable_median = np.median(state.variable_norms, axis=0)
                state.median_age = 0
            state.median_age += len(global_norm)
            median = state.variable_median
            too_big_v |= ((per_variable > params.median_factor * median) &
                          (median > 0)).any(axis=0)
        counted = (batch.nan_count + batch.inf_count).max(axis=1) > 0  # [S, N]
        finite = np.isfinite(global_norm)
        # A step without any gradient has no norm: its 0 is no history (a median of such
        # zeros made the first healthy step after them "100x the median").
        kept = finite & batch.present.any(axis=(1, 2))
        state.global_norms = np.concatenate(
            [state.global_norms, global_norm[kept]])[-params.window_steps:]
        state.variable_norms = np.concatenate(
            [state.variable_norms, per_variable[kept].astype(np.float32)]
        )[-params.window_steps:]
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
        streak = state.steps
        for step_small in small:  # a loop over steps (<= batch size), vectorized over variables
            streak = np.where(step_small, streak + 1, 0)
        state.steps = streak

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
