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

from gradwatch.agent.core.doctor import Report
from gradwatch.agent.torch.diagnosis import Recorder, diagnose
from gradwatch.agent.torch.names import parameter_names


def _names(optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """Parameter names from the live module holding most of ``optimizer``'s parameters
    (the outermost of those that hold as many)."""
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
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

    def before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Explains the parameters without gradient with the step's recording; records the
        next step if some could not be explained yet."""
        recording = self.recorder.take()
        self.report.seen += 1
        self.updated.update(id(p) for group in optimizer.param_groups for p in group["params"])
        missing = [(g, j, p) for g, group in enumerate(optimizer.param_groups)
                   for j, p in enumerate(group["params"])
                   if p.grad is None and id(p) not in self.explained]
        if missing:
            names = _names(optimizer)
            missing = [(p, names.get(id(p)) or f"group{g}.param{j}") for g, j, p in missing]
        if recording is not None:
            for param, name in missing:
                self.explained.add(id(param))
                self.report.add(param, diagnose(recording, param, name, self.updated))
            recording.release()
        elif missing:
            self.recorder.start()


@contextlib.contextmanager
def diagnose_missing_gradients() -> Iterator[Report]:
    """Watches every optimizer step inside the block and collects why parameters get no
    gradient (recording steps makes them slower)."""
    report = Report()
    watch = _Watch(report)
    hooks = [register_optimizer_step_pre_hook(watch.before_step)]
    watch.recorder.start()
    try:
        yield report
    finally:
        watch.recorder.stop()
        for hook in hooks:
            hook.remove()
