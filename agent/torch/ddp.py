"""DistributedDataParallel: measure each rank's gradients before the all-reduce.

DDP runs a communication hook per gradient bucket on the autograd thread, with the
bucket's local gradients. `measuring_hook` measures them (one multi-tensor norm per
bucket, on their device, no synchronisation), hands the measures to the wrapped
optimizer that owns the parameters (its next step takes them), then calls the hook it
wraps: DDP's own all-reduce unless the user brings one. A bucket that never becomes
ready (a parameter without a gradient and ``find_unused_parameters=False``) runs no
hook; its parameters are read from ``.grad`` at the optimizer step instead, which then
still holds local gradients.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


#: Marks the hooks `measuring_hook` makes.
_MEASURES = "_gradwatch_measures"


def comm_hook_of(model: Any) -> Callable | None:
    """The communication hook registered on a DDP model, if any (DDP takes one)."""
    hooks = getattr(model, "_comm_hooks", None)
    return hooks[0][0] if hooks else None


def measures(hook: Callable) -> bool:
    """Whether ``hook`` is one of `measuring_hook`'s."""
    return getattr(hook, _MEASURES, False)


def measuring_hook(monitor: Any, hook: Callable | None = None) -> Callable:
    """A hook for ``ddp_model.register_comm_hook(state, ...)`` that measures, then runs
    ``hook(state, bucket)`` (default: all-reduce over ``state``, a process group or None
    for the default one)."""
    if hook is None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        hook = allreduce_hook

    @functools.wraps(hook)  # (DDP checks and logs a hook by its name)
    def measured(state, bucket):
        try:
            params = bucket.parameters()
            for watched in monitor.watching(params):
                if not watched.measures():  # a failure stops it measuring, logged once
                    continue
                grads = bucket.gradients()
                mine = watched.param_ids
                if not mine.issuperset(map(id, params)):  # a bucket of several optimizers'
                    kept = [i for i, p in enumerate(params) if id(p) in mine]
                    watched.measure_part([params[i] for i in kept], [grads[i] for i in kept])
                else:
                    watched.measure_part(params, grads)
        except Exception:  # never break the backward pass
            log.exception("gradwatch: measuring a DDP bucket failed")
        return hook(state, bucket)

    setattr(measured, _MEASURES, True)
    return measured
