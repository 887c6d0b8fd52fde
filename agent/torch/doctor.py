"""Diagnose-only mode for PyTorch: explain missing gradients without a collector.

In a notebook::

    from gradwatch.agent.torch.doctor import diagnose_missing_gradients
    with diagnose_missing_gradients() as report:
        train_one_epoch(model, optimizer)
    print(report)

Every optimizer's step inside the block is watched (a global optimizer step hook): a
parameter of its param groups without a gradient is explained from the recorded step
that led to it (the first step is always recorded). Parameters are named after the
module that holds most of the optimizer's parameters (``model.named_parameters()``,
wrappers' prefixes removed; found among live modules when a step needs names); others
as ``group{i}.param{j}``.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from gradwatch.agent.core.diagnosis import Cause
from gradwatch.agent.core.doctor import Report
from gradwatch.agent.torch.diagnosis import Recorder, StepRecording, diagnose
from gradwatch.agent.torch.names import parameter_names


def _names(ids: set[int]) -> dict[int, str]:
    """Parameter names from the live module holding most of the parameters ``ids`` (the
    outermost of those that hold as many)."""
    best, best_key = None, (0, 0)
    # type(), not isinstance(): that reads __class__, which raises for a dead
    # weakref.proxy (Dynamo leaves some) and warns for deprecated objects (reduce_op).
    modules = [obj for obj in gc.get_objects() if issubclass(type(obj), torch.nn.Module)]
    for module in modules:
        params = [id(p) for p in module.parameters()]
        key = (len(ids.intersection(params)), len(params))
        if key > best_key:
            best, best_key = module, key
    return parameter_names(best) if best is not None else {}


class _Watch:
    """The state of one `diagnose_missing_gradients` block (training thread)."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self.recorder = Recorder()
        self.explained: set[int] = set()
        #: The parameters of every optimizer stepped in the block (ids).
        self.updated: set[int] = set()
        #: Parameters seen without gradient at a step that had no recording (ids).
        self.unexplained: set[int] = set()

    def before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Explains the parameters without gradient with the step's recording; records until
        the next step while some could not be explained yet (that step may be another
        optimizer's: a GAN's generator's parameters are explained at its next step, the
        recording from the critic's step to it)."""
        recording = self.recorder.take()
        self.report.seen += 1
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.updated.update(id(p) for p in params)
        missing = [(g, j, p) for g, group in enumerate(optimizer.param_groups)
                   for j, p in enumerate(group["params"])
                   if p.grad is None and id(p) not in self.explained]
        if missing:
            names = _names({id(p) for p in params})
            missing = [(p, names.get(id(p)) or f"group{g}.param{j}") for g, j, p in missing]
        if recording is not None:
            for param, name in missing:
                self.explained.add(id(param))
                self.report.add(param, diagnose(recording, param, name, self.updated))
            recording.release()
        else:
            self.unexplained.update(id(p) for p, _ in missing)
        self.unexplained -= self.explained
        # (and those present now: missing at some steps only)
        self.unexplained -= {id(p) for p in params if p.grad is not None}
        if self.unexplained:
            self.recorder.start()

    def explain_no_graph(self, recording: StepRecording) -> None:
        """``backward()`` is about to raise ("element 0 of tensors does not require grad"):
        every parameter the recorded step read gets none, and no step follows."""
        params = recording.parameter_tensors()
        names = _names(set(params))
        self.report.seen += 1
        for k, (key, param) in enumerate(params.items()):
            if key not in self.explained:
                verdict = diagnose(recording, param, names.get(key) or f"param{k}",
                                   self.updated)
                if verdict.cause is not Cause.UNKNOWN:
                    self.explained.add(key)
                    self.report.add(param, verdict)


@contextlib.contextmanager
def diagnose_missing_gradients() -> Iterator[Report]:
    """Watches every optimizer step inside the block and collects why parameters get no
    gradient (recording steps makes them slower)."""
    report = Report()
    watch = _Watch(report)
    watch.recorder.on_no_graph = watch.explain_no_graph
    hooks = [register_optimizer_step_pre_hook(watch.before_step)]
    watch.recorder.start()
    try:
        yield report
    finally:
        watch.recorder.stop()
        for hook in hooks:
            hook.remove()
