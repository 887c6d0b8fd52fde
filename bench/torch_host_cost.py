"""Host time the PyTorch agent adds to an optimizer step, by parameter count.

Where a GPU step is bound by how fast the host launches kernels (small models, small
batches), every microsecond the training thread spends in gradwatch lengthens the step,
while the kernels the statistics launch take microseconds of device time. Two identical
sets of ``--params`` small parameters train side by side, one watched, in interleaved
rounds, so that the model's own work is small; prints the added time per step (watched
minus plain, the median over rounds, with their range), and how much of it the hooks
themselves take (`before_step`, `after_step` and `zero_grad`'s note, wall clock on the
training thread). No collector (the sender buffers, as it would with one away).
Also prints how many ATen ops gradwatch adds to a step (each a kernel launch, or more
host work, on an accelerator). ``--profile`` adds a cProfile table of the watched steps;
``--norms-alone`` runs, on the CPU, what an accelerator runs.

    .venv/bin/python -m bench.torch_host_cost [--params 53,161] [--device cpu] [--steps 200]
        [--zero-in-place] [--norms-alone]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import logging
import pstats
import statistics
import time
from collections.abc import Callable, Iterator

import torch

from gradwatch.agent.torch import GradientMonitor, stats
from gradwatch.agent.torch.monitor import _Watched
from gradwatch.agent.torch.session import TorchSession
from tests.support.torch_ops import OpCounter


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="53,161", help="comma-separated parameter counts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=1024, help="elements per parameter")
    parser.add_argument("--steps", type=int, default=200, help="steps per round")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the hooks")
    parser.add_argument("--zero-in-place", action="store_true",
                        help="zero_grad(set_to_none=False), as gradient accumulation loops "
                             "often write it (default: zero_grad(), which sets them to None)")
    parser.add_argument("--norms-alone", action="store_true",
                        help="record the norms alone, as on an accelerator (on the CPU the "
                             "agent also counts NaN and Inf elements)")
    return parser.parse_args(argv)


#: gradwatch's work on the training thread at each step: the optimizer's pre- and
#: post-step hooks, and the note `zero_grad` takes.
HOOKS = ((_Watched, "before_step"), (_Watched, "after_step"),
         (TorchSession, "gradients_zeroed"))


@contextlib.contextmanager
def around_hooks(wrap: Callable[[str, Callable], Callable]) -> Iterator[None]:
    """Replaces each of `HOOKS` by ``wrap(name, original)`` inside the block (bench only;
    a hook an older agent lacks is left out)."""
    originals = [(owner, name, getattr(owner, name)) for owner, name in HOOKS
                 if hasattr(owner, name)]
    for owner, name, original in originals:
        setattr(owner, name, wrap(name, original))
    try:
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


class HookTimer:
    """Sums the wall time of gradwatch's hooks while entered (training thread)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._installed = around_hooks(self._timed)

    def __enter__(self) -> HookTimer:
        self._installed.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._installed.__exit__(*exc)

    def _timed(self, name: str, original: Callable) -> Callable:
        @functools.wraps(original)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed


def make_step(count: int, args: argparse.Namespace, monitor: GradientMonitor | None):
    device = torch.device(args.device)
    params = [torch.nn.Parameter(torch.randn(args.size, device=device)) for _ in range(count)]
    optimizer = torch.optim.SGD(params, 1e-3, foreach=True)
    if monitor is not None:
        monitor.wrap(optimizer)

    def step() -> None:
        optimizer.zero_grad(set_to_none=not args.zero_in_place)
        torch.stack([p.sum() for p in params]).sum().backward()
        optimizer.step()
    return step


def measure(count: int, args: argparse.Namespace) -> dict:
    """Per round, microseconds per step: added by gradwatch, and spent in its hooks."""
    monitor = GradientMonitor(collector="127.0.0.1:9", training_job="host-cost")
    plain, watched = make_step(count, args, None), make_step(count, args, monitor)
    cuda = args.device.startswith("cuda")

    def block(step) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.steps * 1e6

    added, hooks = [], []
    profile = cProfile.Profile()
    with HookTimer() as timer:
        block(plain), block(watched)  # warm up
        for r in range(args.rounds):
            timer.seconds = 0.0
            if r % 2:
                watched_us, plain_us = block(watched), block(plain)
            else:
                plain_us, watched_us = block(plain), block(watched)
            added.append(watched_us - plain_us)
            hooks.append(timer.seconds / args.steps * 1e6)
        if args.profile:
            profile.enable()
            block(watched)
            profile.disable()
    ops = []
    for step in (plain, watched):
        with OpCounter() as counter:
            step()
        ops.append(counter.ops)
    monitor.close(timeout_s=0.1)
    return {"added": added, "hooks": hooks, "plain_us": plain_us, "profile": profile,
            "ops": ops[1] - ops[0]}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the sender's "collector away" lines
    if args.norms_alone:
        stats.counts_exactly = lambda device: False
    print(f"torch {torch.__version__}, device {args.device}, {args.size} elements per "
          f"parameter, {args.rounds} rounds x {args.steps} steps"
          + (", zero_grad(set_to_none=False)" if args.zero_in_place else "")
          + (", norms alone" if args.norms_alone else ""))
    for count in map(int, args.params.split(",")):
        result = measure(count, args)
        added, hooks = result["added"], result["hooks"]
        print(f"{count:5d} parameters: plain step {result['plain_us']:7.1f} us; gradwatch adds "
              f"{statistics.median(added):7.1f} us per step (rounds {min(added):.1f} to "
              f"{max(added):.1f}), {statistics.median(added) / count:.2f} us per parameter; "
              f"its hooks take {statistics.median(hooks):7.1f} us and add {result['ops']} "
              "ATen ops", flush=True)
        if args.profile:
            pstats.Stats(result["profile"]).sort_stats("tottime").print_stats(
                "agent|torch/_|built-in", 15)

if __name__ == "__main__":
    main()
