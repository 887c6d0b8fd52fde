"""Parameter names as users know them: ``model.named_parameters()`` without the wrappers'
prefixes (DDP's ``module.``, ``torch.compile``'s ``_orig_mod.``, FSDP1's
``_fsdp_wrapped_module.``, activation checkpointing's ``_checkpoint_wrapped_module.``)."""

from __future__ import annotations

import torch

#: Path components that wrappers insert anywhere in a name.
_INSERTED = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DDP and ``torch.compile`` wrappers."""
    while True:
        inner = getattr(model, "module", None) if _is_ddp(model) else None
        inner = inner or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def _is_ddp(model: object) -> bool:
    return type(model).__name__ == "DistributedDataParallel"


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
    if _is_ddp(model):
        return "DistributedDataParallel"
    inner = unwrap(model)
    if type(inner).__name__ == "FullyShardedDataParallel":
        return "FSDP"
    if any(type(m).__name__.startswith("FSDP") for m in inner.modules()):
        return "FSDP2"
    return ""
