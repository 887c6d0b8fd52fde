"""ReplicaDivergence and WorkerSilent: how the tasks and replicas of one job compare,
and which stopped reporting."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from gradwatch.collector.alerts import Alert
from gradwatch.collector.rules.base import Params, Rule, above, alert, names, reporting
from gradwatch.collector.state import Group


@dataclass(frozen=True)
class DivergenceParams(Params):
    norm_ratio: float = above(10.0, 1)


class ReplicaDivergence(Rule[None]):
    """Replicas or workers of one job disagree at the same step: a gradient present on
    some and absent on others, finite on some and not on others, or global norms
    whose max/min ratio exceeds ``norm_ratio`` (sharded jobs: presence only). Compares
    the latest step of every task that has reached the group's newest step."""

    name = "ReplicaDivergence"
    Params = DivergenceParams

    def evaluate(self, group: Group, states: Mapping[str, None], params: DivergenceParams,
                 now: float) -> list[Alert]:
        sessions = reporting(group)
        if not sessions:
            return []
        newest = max(s.last_step for s in sessions)
        peers = [s for s in sessions if s.last_step == newest]
        if sum(s.num_replicas for s in peers) < 2:
            return []
        n = len(group.names)
        present, nonfinite, norms, labels = [], [], [], []
        for s in peers:
            reported = np.zeros(n, bool)
            reported[s.columns] = True
            for r in range(s.num_replicas):
                row_present, row_bad = np.zeros(n, bool), np.zeros(n, bool)
                row_present[s.columns] = s.present[r]
                row_bad[s.columns] = s.nonfinite[r]
                present.append(np.where(reported, row_present, True))
                nonfinite.append(row_bad)
                labels.append(f"{s.task} replica {r}")
            norms.extend(s.global_norm.tolist())
        present, nonfinite, norms = np.array(present), np.array(nonfinite), np.array(norms)
        presence_differs = present.any(axis=0) & ~present.all(axis=0)
        # Shards (FSDP, tensor parallel) hold different elements, so they differ in global
        # norm, and a NaN sits in the shard holding it (or a rank holds none of a
        # parameter): only presence is compared.
        finiteness_differs = (nonfinite.any(axis=0) & ~nonfinite.all(axis=0)
                              & (not group.sharded))
        finite_norms = norms[np.isfinite(norms)]
        ratio = (finite_norms.max() / finite_norms.min()
                 if finite_norms.size >= 2 and finite_norms.min() > 0 and not group.sharded
                 else 1.0)
        reasons = []
        if presence_differs.any():
            reasons.append("gradient present on some replicas only")
        if finiteness_differs.any():
            reasons.append("NaN/Inf on some replicas only")
        if ratio > params.norm_ratio:
            reasons.append(f"global norms differ {ratio:.3g}x (limit {params.norm_ratio:g}x)")
        if not reasons:
            return []
        odd = np.flatnonzero(~present.all(axis=1) | nonfinite.any(axis=1))
        if ratio > params.norm_ratio:
            odd = np.union1d(odd, [int(np.nanargmax(norms)), int(np.nanargmin(norms))])
        return [alert(self.name, "warning", group,
                      f"Replicas of {group.training_job} ({group.optimizer}) disagree at "
                      f"step {newest}", "; ".join(reasons).capitalize() + ".",
                      names(group, presence_differs | finiteness_differs),
                      [labels[i] for i in odd])]


@dataclass(frozen=True)
class SilenceParams(Params):
    seconds: float = above(60.0, 0)
    #: Before a task's first step: tracing and compiling a first step can take minutes.
    first_step_seconds: float = above(600.0, 0)


class WorkerSilent(Rule[None]):
    """A task that has not said goodbye reported no step, with any of the job's optimizers,
    for ``seconds`` (``first_step_seconds`` before its first step, and a PyTorch task's
    second: its agent runs the first uncompiled, to explain any missing gradient, so a
    ``torch.compile``d model compiles in the second); a task that registers again past
    its first step (`pb.RegisterRequest.stepped`: with a collector that lost it, or
    another replica) is silent since it registered. An optimizer that is idle while
    another of the task trains (GANs, distillation, layer-wise schedules) is not a silent
    task; its ``gradwatch_last_report_timestamp_seconds`` shows it."""

    name = "WorkerSilent"
    Params = SilenceParams

    def evaluate(self, group: Group, states: Mapping[str, None], params: SilenceParams,
                 now: float) -> list[Alert]:
        def silent(session) -> bool:
            if session.closed:
                return False
            task = group.task_sessions(session.task_type, session.task_index) or [session]
            stepped = [s for s in task if s.steps_total or s.stepped_before]
            if stepped:
                # (its step 0: not the first step a restarted collector hears of)
                compiling = all(s.last_step == 0 and "torch" in s.versions for s in stepped)
                # (registered again after a collector lost it: silent since then)
                return now - max(s.last_report_time or s.registered_at for s in stepped) > (
                    params.first_step_seconds if compiling else params.seconds)
            return now - min(s.registered_at for s in task) > params.first_step_seconds

        silent = [s.task for s in group.sessions.values() if silent(s)]
        if not silent:
            return []
        return [alert(self.name, "warning", group,
                      f"{len(silent)} task(s) of {group.training_job} ({group.optimizer}) "
                      f"stopped reporting",
                      f"No report for more than {params.seconds:g} s: the process may be hung, "
                      "dead, or cut off from the collector.", [], sorted(silent))]
