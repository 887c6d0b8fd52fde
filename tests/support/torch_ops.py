"""Counting the ATen ops PyTorch code dispatches (each a kernel launch, or more host work,
on an accelerator), for the PyTorch agent's tests and benchmarks."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched on this thread while entered."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))
