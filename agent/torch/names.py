"""Parameter names as users know them: ``model.named_parameters()`` without the wrappers'
prefixes (DDP's and DataParallel's ``module.``, ``torch.compile``'s ``_orig_mod.``, FSDP1's
``_fsdp_wrapped_module.``, activation checkpointing's ``_checkpoint_wrapped_module.``)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

#: Path components that wrappers insert anywhere in a name.
_INSERTED = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


#: Wrappers that hold the user's module as ``module``.
_HOLDING_MODULE = frozenset({"DistributedDataParallel", "DataParallel"})


def _layers(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` and the modules its wrappers hold, outermost first: DDP's and
    DataParallel's ``module``, ``torch.compile``'s ``_orig_mod``, in any nesting."""
    while isinstance(model, torch.nn.Module):
        yield model
        inner = getattr(model, "module", None) if type(model).__name__ in _HOLDING_MODULE \
            else None
        # (not ``inner or``: a compiled module's truth value asks the module for len())
        model = inner if inner is not None else getattr(model, "_orig_mod", None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DDP, DataParallel and ``torch.compile`` wrappers."""
    *_, inner = _layers(model)
    return inner


def ddp_of(model: torch.nn.Module | None) -> torch.nn.Module | None:
    """The ``DistributedDataParallel`` in ``model``'s wrappers (``torch.compile(ddp)``
    included), if any."""
    if model is None:
        return None
    return next((m for m in _layers(model) if type(m).__name__ == "DistributedDataParallel"),
                None)


def parameter_names(model: torch.nn.Module) -> dict[int, str]:
    """Parameter id → name."""
    names = {}
    for name, param in unwrap(model).named_parameters(remove_duplicate=True):
        parts = [p for p in name.split(".") if p not in _INSERTED]
        names.setdefault(id(param), ".".join(parts))
    return names


def strategy_of(model: torch.nn.Module | None) -> str:
    """What distributes the model: ``DistributedDataParallel``, ``FSDP``, ``FSDP2`` or
    "" (reported with the session)."""
    if model is None:
        return ""
    if ddp_of(model) is not None:
        return "DistributedDataParallel"
    inner = unwrap(model)
    if type(inner).__name__ == "FullyShardedDataParallel":
        return "FSDP"
    if any(type(m).__name__.startswith("FSDP") for m in inner.modules()):
        return "FSDP2"
    return ""
