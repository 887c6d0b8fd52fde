"""Where a step's gradients are measured before ``optimizer.step``: gradient clipping and
``GradScaler``.

While at least one monitor is open, these torch functions are wrapped (module
attributes and ``GradScaler`` methods, restored when the last monitor closes):

- ``torch.nn.utils.clip_grad_norm_``, ``clip_grad_value_`` and ``clip_grads_with_norm_``
  (`_CLIPPING`): the watched optimizers whose parameters are clipped are measured
  first, so norms are those the backward pass produced (a program that imported the
  function before the monitor existed calls the original: its norms are then measured
  after clipping);
- FSDP1's ``FullyShardedDataParallel.clip_grad_norm_`` (where the program imported FSDP
  before the monitor opened): as the functions above;
- the join hooks of DDP and of ``ZeroRedundancyOptimizer`` (imported before the monitor
  opened): what a rank joined under ``Join`` (uneven inputs) does to shadow the others, an
  all-reduce of zeros and an optimizer step, is neither measured nor a training step;
- ``GradScaler.unscale_``: measured right after unscaling (before any clipping);
- ``GradScaler.step``: measured (norms divided by the scale, if not unscaled yet), and
  a step the scaler skips (NaN/Inf from overflow) still ends the gradwatch step, so it
  is reported — as skipped, since the session says its loss is scaled;
- ``torch.nn.Module.zero_grad``: a wrapped optimizer's model zeroing its gradients
  (in place, ``set_to_none=False``) says its gradients are not the next step's yet;
- ``DistributedDataParallel.__init__``: a DDP made around parameters of an optimizer
  wrapped before (Hugging Face Accelerate's ``prepare`` after ``wrap``) gets the measuring
  communication hook, so each rank's gradients are measured before the all-reduce;
- ``DistributedDataParallel.register_comm_hook``: a hook of the user's (fp16 compression,
  PowerSGD) is measured before, registered before or after ``wrap``.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.amp import GradScaler

from gradwatch.agent.torch import ddp

_lock = threading.Lock()
_monitors: list[Any] = []
_originals: dict[tuple[Any, str], Callable] = {}


def _each_watched(params: Iterable[torch.Tensor]) -> list[Any]:
    params = list(params)
    return [w for monitor in list(_monitors) for w in monitor.watching(params)]


def _as_list(parameters: Any) -> list[torch.Tensor]:
    return [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)


def _measure_before_clipping(parameters: list[torch.Tensor]) -> list[Any]:
    """Measures unless measured already and the gradients are as the last clip left them
    (a clip after every micro-batch measures the sum so far, up to the last one)."""
    watching = _each_watched(parameters)
    for watched in watching:
        watched.before_step(after_clip=True)
    return watching


def _note_clipped(watching: list[Any]) -> None:
    for watched in watching:
        watched.clipped()


def _clipping(original: Callable) -> Callable:
    measure = torch.compiler.disable(_measure_before_clipping)  # see `install`
    note = torch.compiler.disable(_note_clipped)

    @functools.wraps(original)
    def clip(parameters: Any, *args: Any, **kwargs: Any) -> Any:
        parameters = _as_list(parameters)
        watching = measure(parameters)
        result = original(parameters, *args, **kwargs)
        note(watching)
        return result

    return clip


def _module_clipping(original: Callable) -> Callable:
    """A model's own clipping method (FSDP1's ``clip_grad_norm_``) over its parameters."""
    measure = torch.compiler.disable(_measure_before_clipping)
    note = torch.compiler.disable(_note_clipped)

    @functools.wraps(original)
    def clip(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        watching = measure(list(self.parameters()))
        result = original(self, *args, **kwargs)
        note(watching)
        return result

    return clip


def _join_main_hook(original: Callable) -> Callable:
    @functools.wraps(original)
    def main_hook(self: Any) -> Any:
        with ddp.shadowing:
            return original(self)

    return main_hook


def _unscale(original: Callable) -> Callable:
    @functools.wraps(original)
    def unscale_(self: GradScaler, optimizer: torch.optim.Optimizer) -> Any:
        scale = self._scale  # (what the gradients the DDP hook measured still carry)
        result = original(self, optimizer)
        watched = _watched(optimizer)
        if watched is not None and self.is_enabled():
            watched.scaled = True
            watched.before_step(parts_scale=scale)
        return result

    return unscale_


def _step(original: Callable) -> Callable:
    @functools.wraps(original)
    def step(self: GradScaler, optimizer: torch.optim.Optimizer, *args: Any,
             **kwargs: Any) -> Any:
        watched = _watched(optimizer)
        if watched is None or not self.is_enabled():
            return original(self, optimizer, *args, **kwargs)
        from torch.amp.grad_scaler import OptState

        watched.scaled = True
        state = self._per_optimizer_states[id(optimizer)]
        still_scaled = state["stage"] is not OptState.UNSCALED
        watched.before_step(self._scale if still_scaled else None)
        watched.stepped = False
        try:
            return original(self, optimizer, *args, **kwargs)
        finally:
            if not watched.stepped:  # the scaler skipped optimizer.step(): NaN/Inf found
                watched.after_step()

    return step


def _zeroed(model: torch.nn.Module) -> None:
    params = None
    for monitor in list(_monitors):
        for watched in monitor.zeroed_with(model):
            if params is None:
                params = {id(p) for p in model.parameters()}
            watched.gradients_zeroed(params)


def _module_zero_grad(original: Callable) -> Callable:
    zeroed = torch.compiler.disable(_zeroed)  # see `install`

    @functools.wraps(original)
    def zero_grad(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        zeroed(self)
        return result

    return zero_grad


def _ddp_init(original: Callable) -> Callable:
    @functools.wraps(original)
    def __init__(self: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        for monitor in list(_monitors):
            monitor.ddp_made(self)

    return __init__


def _register_comm_hook(original: Callable) -> Callable:
    """A communication hook of the user's is measured before: wrapped as
    ``monitor.comm_hook(hook)`` would, or run by gradwatch's own registered before it (DDP
    takes one hook: a second registration raises)."""
    @functools.wraps(original)
    def register_comm_hook(self: Any, state: Any, hook: Callable) -> Any:
        monitors = list(_monitors)
        if not monitors or ddp.measures(hook):
            return original(self, state, hook)
        registered = ddp.comm_hook_of(self)
        if ddp.measures(registered) and registered.default:
            check = getattr(self, "_check_comm_hook", None)  # (DDP's checks of a hook)
            if check is not None:
                check(hook)
            registered.take(hook, state)
            return None
        return original(self, state, monitors[-1].comm_hook(hook))

    return register_comm_hook


def _watched(optimizer: Any) -> Any:
    for monitor in list(_monitors):
        watched = monitor.watched(optimizer)
        if watched is not None:
            return watched
    return None


#: Functions that clip the gradients of their first argument's parameters in place: the
#: classic ones, the deprecated alias, and torch ≥ 2.6's split API (``get_total_norm``,
#: then ``clip_grads_with_norm_``, as TorchTitan clips FSDP2 gradients).
_CLIPPING = ("clip_grad_norm_", "clip_grad_value_", "clip_grad_norm", "clip_grads_with_norm_")

_PATCHES: list[tuple[Any, str, Callable[[Callable], Callable]]] = [
    *((owner, name, _clipping) for owner in (torch.nn.utils, torch.nn.utils.clip_grad)
      for name in _CLIPPING if hasattr(owner, name)),
    (GradScaler, "unscale_", _unscale),
    (GradScaler, "step", _step),
    (torch.nn.Module, "zero_grad", _module_zero_grad),
    (torch.nn.parallel.DistributedDataParallel, "__init__", _ddp_init),
    (torch.nn.parallel.DistributedDataParallel, "register_comm_hook", _register_comm_hook),
]


def _loaded_patches() -> list[tuple[Any, str, Callable[[Callable], Callable]]]:
    """`_PATCHES`, and those of modules the program imported (not imported here: FSDP1
    takes a second to import) or of internals this torch has."""
    def found(module: str, name: str) -> Any:
        return getattr(sys.modules.get(module), name, None)

    optional = [(found("torch.distributed.fsdp", "FullyShardedDataParallel"),
                 "clip_grad_norm_", _module_clipping),
                (found("torch.nn.parallel.distributed", "_DDPJoinHook"),
                 "main_hook", _join_main_hook),
                (found("torch.distributed.optim.zero_redundancy_optimizer", "_ZeROJoinHook"),
                 "main_hook", _join_main_hook)]
    return [*_PATCHES, *((owner, name, wrapper) for owner, name, wrapper in optional
                         if owner is not None and hasattr(owner, name))]


def install(monitor: Any) -> None:
    """Patches while ``monitor`` is open. Where a caller is compiled, gradwatch's part of
    each patch runs eagerly (`torch.compiler.disable`), applied here rather than at import:
    Dynamo takes 1.5 s to import, which making a torch optimizer pays anyway."""
    with _lock:
        if not _monitors:
            for owner, name, wrapper in _loaded_patches():
                original = getattr(owner, name)
                _originals[(owner, name)] = original
                setattr(owner, name, wrapper(original))
        _monitors.append(monitor)


def uninstall(monitor: Any) -> None:
    with _lock:
        if monitor in _monitors:
            _monitors.remove(monitor)
        if not _monitors:
            for (owner, name), original in _originals.items():
                setattr(owner, name, original)
            _originals.clear()
