"""DistributedDataParallel: measure each rank's gradients before the all-reduce.

DDP runs a communication hook per gradient bucket on the autograd thread, with the
bucket's local gradients. `MeasuringHook` measures them (one multi-tensor norm per
bucket, on their device, no synchronisation), hands the measures to the wrapped
optimizer that owns the parameters (its next step takes them), then calls the hook it
wraps: DDP's own all-reduce unless the user brings one. A bucket that never becomes
ready (a parameter without a gradient and ``find_unused_parameters=False``) runs no
hook; its parameters are read from ``.grad`` at the optimizer step instead, which then
still holds local gradients.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def comm_hook_of(model: Any) -> Callable | None:
    """The communication hook registered on a DDP model, if any (DDP takes one)."""
    hooks = getattr(model, "_comm_hooks", None)
    return hooks[0][0] if hooks else None


def measures(hook: Callable) -> bool:
    """Whether ``hook`` is a `MeasuringHook`."""
    return isinstance(hook, MeasuringHook)


class _Shadowing:
    """Whether a rank joined under ``Join`` (uneven inputs) shadows the ranks still
    training: its join hooks run an all-reduce of zeros per bucket (DDP's) and an optimizer
    step (``ZeroRedundancyOptimizer``'s), which are not training (training thread)."""

    def __init__(self) -> None:
        self._depth = 0

    @property
    def active(self) -> bool:
        return self._depth > 0

    def __enter__(self) -> None:
        self._depth += 1

    def __exit__(self, *exc_info: Any) -> None:
        self._depth -= 1


shadowing = _Shadowing()


class MeasuringHook:
    """A hook for ``ddp_model.register_comm_hook(state, ...)`` that measures each bucket's
    gradients for the monitor's wrapped optimizers, then runs ``hook(state, bucket)``
    (default: DDP's all-reduce over ``state``, a process group or None for the default
    one), on the autograd thread. Carries that hook's name: DDP checks and logs hooks by
    name."""

    def __init__(self, monitor: Any, hook: Callable | None = None) -> None:
        self.monitor = monitor
        #: DDP's own all-reduce, which a hook the user registers later may replace (`take`).
        self.default = hook is None
        if hook is None:
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
            hook = allreduce_hook
        self._wrap(hook, None)

    def _wrap(self, hook: Callable, state: tuple[Any] | None) -> None:
        self.hook, self.state = hook, state
        self.__wrapped__ = hook
        self.__name__ = getattr(hook, "__name__", type(hook).__name__)
        self.__qualname__ = getattr(hook, "__qualname__", self.__name__)

    def take(self, hook: Callable, state: Any) -> None:
        """Runs ``hook`` with ``state`` from now on, in place of DDP's all-reduce (`default`:
        the user registers a hook after gradwatch registered its own, and DDP takes one)."""
        self.default = False
        self._wrap(hook, (state,))

    def __call__(self, state: Any, bucket: Any) -> Any:
        if not shadowing.active:  # (a joined rank's zeros are nothing of its own)
            self._measure(bucket)
        return self.hook(state if self.state is None else self.state[0], bucket)

    def _measure(self, bucket: Any) -> None:
        try:
            params = bucket.parameters()
            for watched in self.monitor.watching(params):
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
