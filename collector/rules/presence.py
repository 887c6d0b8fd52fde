"""GradientMissing and GradientNonFinite: what the latest batches of a group say about
each variable's gradient."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from gradwatch.collector.alerts import UNDIAGNOSED, Alert
from gradwatch.collector.rules.base import (
    Params,
    Rule,
    SinceEvaluation,
    above,
    alert,
    flagged,
    listing,
    names,
    reporting,
)
from gradwatch.collector.state import Group, SessionState, StepBatch


def _causes(group: Group, columns: np.ndarray) -> str:
    """Agents' diagnoses of these columns, variables sharing a cause listed together."""
    by_explanation: dict[str, list[str]] = {}
    for column in np.flatnonzero(columns):
        cause = group.causes.get(int(column))
        if cause is not None:
            by_explanation.setdefault(cause.explanation, []).append(group.names[column])
    return " | ".join(f"{listing(variables)}: {explanation}"
                      for explanation, variables in list(by_explanation.items())[:10])


@dataclass(frozen=True)
class MissingParams(Params):
    #: Consecutive steps a variable must miss its gradient (on some replica) to be flagged:
    #: more than 1 for models that skip parts on purpose (LayerDrop, stochastic depth,
    #: experts routed away). A step without any gradient is flagged at once.
    steps: int = above(1, 0)


class MissingSince(SinceEvaluation):
    """`SinceEvaluation`, and whether some step of some replica had no gradient at all."""

    def __init__(self, num_replicas: int, num_variables: int) -> None:
        super().__init__(num_variables)
        self.none_at_all = False
        #: Consecutive steps each replica missed each variable's gradient (where steps > 1).
        self.streak = np.zeros((num_replicas, num_variables), np.int64)

    def raise_missing(self, absent: np.ndarray, steps: int = 1) -> None:
        """``absent``: [steps, replicas, variables]; flags the variables that one replica
        missed for ``steps`` steps in a row by the end of any of these steps (replicas that
        skip a part by turns, each once, are no streak)."""
        blank = absent.all(axis=2).any(axis=1)  # [steps]: no gradient at all on a replica
        none_at_all = bool(blank.any())
        self.none_at_all = none_at_all if self._looked else self.none_at_all or none_at_all
        if steps == 1:
            self.raise_flags(absent.any(axis=(0, 1)))
            return
        streak, reached = self.streak, np.zeros_like(self.flags)
        for missing, empty in zip(absent, blank, strict=True):  # vectorized over replicas
            streak = np.where(missing, streak + 1, 0)            # and variables
            reached |= (streak >= steps).any(axis=0) | (missing.any(axis=0) & empty)
        self.streak = streak
        self.raise_flags(reached)


class GradientMissing(Rule[MissingSince]):
    """A trainable variable got no gradient in a batch since the last evaluation, on some
    task or replica (for ``steps`` steps in a row). Critical when a step of a task (on
    some replica) had no gradient for any variable; variables missing at different steps
    (heads trained in turn) are not."""

    name = "GradientMissing"
    Params = MissingParams

    def new_state(self, session: SessionState) -> MissingSince:
        return MissingSince(session.num_replicas, session.num_variables)

    def observe(self, state: MissingSince, session: SessionState, batch: StepBatch,
                params: MissingParams) -> None:
        state.raise_missing(~batch.present, params.steps)

    def evaluate(self, group: Group, states: Mapping[str, MissingSince],
                 params: MissingParams, now: float) -> list[Alert]:
        seen = {sid: state.look() for sid, state in states.items()}
        missing, tasks = flagged(group, lambda s: seen.get(s.id))
        if not tasks:
            return []
        all_missing = any(states[s.id].none_at_all for s in reporting(group) if s.id in states)
        variables = names(group, missing)
        causes = _causes(group, missing)
        return [alert(
            self.name, "critical" if all_missing else "warning", group,
            f"{len(variables)} of {len(group.names)} variables of {group.training_job} "
            f"({group.optimizer}) get no gradient",
            "These variables are not being trained." + (f" Why: {causes}" if causes else ""),
            variables, tasks, causes=causes or f"{UNDIAGNOSED} (yet: the agent explains a "
            "missing gradient where it can tell, within a step or two; or its diagnosis is "
            "off; docs/diagnosis.md)")]


class GradientNonFinite(Rule[SinceEvaluation]):
    """NaN or Inf in any gradient of a batch since the last evaluation (steps a
    loss-scale optimizer skips are not counted: see `SessionState.nonfinite_steps`)."""

    name = "GradientNonFinite"

    def new_state(self, session: SessionState) -> SinceEvaluation:
        return SinceEvaluation(session.num_variables)

    def observe(self, state: SinceEvaluation, session: SessionState, batch: StepBatch,
                params: Params) -> None:
        state.raise_flags(session.nonfinite_steps(batch).any(axis=(0, 1)))

    def evaluate(self, group: Group, states: Mapping[str, SinceEvaluation], params: Params,
                 now: float) -> list[Alert]:
        seen = {sid: state.look() for sid, state in states.items()}
        bad, tasks = flagged(group, lambda s: seen.get(s.id))
        if not tasks:
            return []
        variables = names(group, bad)
        return [alert(self.name, "critical", group,
                      f"NaN or Inf in the gradients of {len(variables)} variables of "
                      f"{group.training_job} ({group.optimizer})",
                      "Updates with these gradients corrupt the weights.", variables, tasks)]
