"""Counting what PyTorch code asks of torch, for the PyTorch agent's tests and benchmarks:
ATen ops dispatched (each a kernel launch, or more host work, on an accelerator) and torch
functions called from Python (each microseconds of host time)."""

from __future__ import annotations

from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode


class _Ops(TorchDispatchMode):
    def __init__(self, counter: OpCounter) -> None:
        super().__init__()
        self._counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._counter.ops += 1
        return func(*args, **(kwargs or {}))


class OpCounter(TorchFunctionMode):
    """While entered, on this thread: ``ops``, the ATen ops dispatched, and ``calls``, the
    torch functions and tensor methods called from Python (reading an attribute such as
    ``.grad`` does not count)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.calls = 0
        self._ops = _Ops(self)

    def __enter__(self) -> OpCounter:
        super().__enter__()
        self._ops.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ops.__exit__(*exc)
        super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) != "__get__":
            self.calls += 1
        return func(*args, **(kwargs or {}))
