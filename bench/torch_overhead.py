"""PyTorch agent overhead: median training-step time with the agent / without, interleaved.

Identical models (one per variant) train side by side in each process; blocks of steps
rotate between them, their order rotating each round, so machine noise hits all alike.
``gradwatch``: the optimizer wrapped by `gradwatch.agent.torch.GradientMonitor`, every
parameter reported every step to a real collector subprocess on loopback (budget: <= 1.02
on CPU, <= 1.01 on a GPU); ``plain_again``: a second plain model, an A/A control.

- ``resnet50``: torchvision's ResNet-50 architecture (bottleneck blocks 3-4-6-3, 161
  parameter tensors, 25.6 M parameters), written out here; ``--image-size`` (64) and
  ``--batch`` (8) set the input;
- ``gpt``: a GPT-style decoder (``--layers`` 4, d=256, 4 heads, 128 tokens, vocabulary
  8,000, batch 8; 12 layers and d=768 is GPT-2 small);
- ``-ddp`` variants: the same under DistributedDataParallel, 2 processes (gloo on CPU,
  NCCL on GPUs), rank 0 reporting.

On a GPU (``--device cuda``) each block is timed between two synchronisations, models use
bf16 autocast; ``--profile`` reports the device time of the kernels gradwatch's hooks launch
per step, and the host time the hooks take.

    .venv/bin/python -m bench.torch_overhead [--cases resnet50,gpt,resnet50-ddp,gpt-ddp]
        [--rounds 10] [--steps 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from bench.spread import round_ratios
from gradwatch.agent.torch import GradientMonitor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="resnet50,gpt")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved block pairs")
    parser.add_argument("--variants", default="plain,gradwatch",
                        help="comma-separated: plain, gradwatch, plain_again (a second plain "
                             "model: an A/A control, whose ratio is the run's resolution)")
    parser.add_argument("--steps", type=int, default=5, help="steps per block")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--profile", action="store_true",
                        help="report what gradwatch's hooks cost per step, from the profiler: "
                             "their kernels' device time (GPU) and their host time")
    return parser.parse_args(argv)


# -- models ----------------------------------------------------------------------------------

class Bottleneck(torch.nn.Module):
    def __init__(self, inputs: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * 4
        self.conv1 = torch.nn.Conv2d(inputs, width, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(width)
        self.conv2 = torch.nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(width)
        self.conv3 = torch.nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = torch.nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or inputs != out:
            self.downsample = torch.nn.Sequential(
                torch.nn.Conv2d(inputs, out, 1, stride, bias=False), torch.nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet50(torch.nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(
            torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False), torch.nn.BatchNorm2d(64),
            torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, 1))
        layers, inputs = [], 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for b in range(blocks):
                layers.append(Bottleneck(inputs, width, stride if b == 0 else 1))
                inputs = width * 4
        self.layers = torch.nn.Sequential(*layers)
        self.fc = torch.nn.Linear(inputs, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean(dim=(2, 3)))


class GPT(torch.nn.Module):
    def __init__(self, layers: int, width: int, vocabulary: int = 8000,
                 context: int = 128) -> None:
        super().__init__()
        self.tokens = torch.nn.Embedding(vocabulary, width)
        self.positions = torch.nn.Embedding(context, width)
        block = torch.nn.TransformerEncoderLayer(width, width // 64, 4 * width, dropout=0.0,
                                                 activation="gelu", batch_first=True,
                                                 norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocabulary, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(n, device=ids.device)
        h = self.tokens(ids) + self.positions(torch.arange(n, device=ids.device))
        return self.head(self.norm(self.blocks(h, mask=mask, is_causal=True)))


def build(case: str, args: argparse.Namespace, device: torch.device):
    """(model, inputs, loss function) of a case, seeded alike for both variants."""
    torch.manual_seed(0)
    if case.startswith("resnet50"):
        model = ResNet50().to(device)
        x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
        y = torch.arange(args.batch, device=device) % 1000
        return model, x, lambda out: torch.nn.functional.cross_entropy(out, y)
    model = GPT(args.layers, args.width).to(device)
    ids = torch.randint(0, 8000, (args.batch, 128), device=device)
    return model, ids[:, :-1], lambda out: torch.nn.functional.cross_entropy(
        out.reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))


# -- timing ----------------------------------------------------------------------------------

def make_step(model, x, loss_fn, optimizer, device: torch.device):
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(model(x))
        loss.backward()
        optimizer.step()
    return step


def time_block(step, steps: int, device: torch.device) -> float:
    """Seconds per step over a block (synchronised at both ends on a GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def run_case(case: str, args: argparse.Namespace, collector: str, rank: int = 0) -> dict:
    device = torch.device(args.device if args.device == "cpu" else f"{args.device}:{rank}")
    distributed = case.endswith("-ddp")
    steps = {}
    monitor = GradientMonitor(collector=collector, training_job=f"bench-{case}")
    variants = args.variants.split(",")
    for variant in variants:
        model, x, loss_fn = build(case, args, device)
        if distributed:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=None if device.type == "cpu" else [device])
        optimizer = torch.optim.AdamW(model.parameters(), 1e-4)
        if variant == "gradwatch":
            monitor.wrap(optimizer, model)
        steps[variant] = make_step(model, x, loss_fn, optimizer, device)
    for step in steps.values():  # warm up (and the first step's diagnosis recording)
        time_block(step, 2, device)
    times = {variant: [] for variant in steps}
    for r in range(args.rounds):
        # The order rotates each round, so that no variant always follows the same one.
        for variant in variants[r % len(variants):] + variants[:r % len(variants)]:
            times[variant].append(time_block(steps[variant], args.steps, device))
    result = {"case": case, "variables": len(list(model.parameters())),
              "ms": {variant: statistics.median(times[variant]) * 1e3 for variant in variants}}
    result["ratios"] = {variant: (result["ms"][variant] / result["ms"]["plain"],
                                  *round_ratios(times[variant], times["plain"])[1:])
                        for variant in variants if variant != "plain"}
    if args.profile:
        result["profile"] = profile_statistics(steps["gradwatch"], device)
    result["acknowledged"] = monitor.close(timeout_s=30)
    return result


def profile_statistics(step, device: torch.device, steps: int = 10) -> dict:
    """Per step, what gradwatch's hooks cost, from the profiler: the device time of the
    kernels they launch and the host time they take on the training thread (each hook
    runs inside a ``record_function`` range while profiling; bench only)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    from bench.torch_host_cost import around_hooks

    def annotated(name, original):
        def hook(*args, **kwargs):
            with record_function(f"gradwatch.{name}"):
                return original(*args, **kwargs)
        return hook

    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with around_hooks(annotated), profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    ours = [e for e in prof.events()
            if e.name.startswith("gradwatch.") and e.device_type == DeviceType.CPU]
    step_kernels = sum(e.device_time_total for e in prof.events()
                       if e.device_type == DeviceType.CPU and not e.cpu_parent)
    return {"kernel_us": sum(e.device_time_total for e in ours) / steps,
            "host_us": sum(e.cpu_time_total for e in ours) / steps,
            "step_kernel_us": step_kernels / steps}


def ddp_worker(rank: int, args: argparse.Namespace, case: str, collector: str, port: int,
               results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    dist.init_process_group("gloo" if args.device == "cpu" else "nccl", rank=rank,
                            world_size=2)
    try:
        result = run_case(case, args, collector, rank)
        if rank == 0:
            results.put(result)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from tests.support.services import CollectorProcess, free_port

    print(f"torch {torch.__version__}, device {args.device}, {os.cpu_count()} CPUs; "
          f"{args.rounds} rounds x {args.steps} steps per variant, interleaved")
    with CollectorProcess() as collector:
        for case in args.cases.split(","):
            if case.endswith("-ddp"):
                import torch.multiprocessing as mp

                context = mp.get_context("spawn")
                results = context.SimpleQueue()
                mp.start_processes(ddp_worker, args=(args, case, collector.grpc_target,
                                                     free_port(), results),
                                   nprocs=2, start_method="spawn")
                result = results.get()
            else:
                result = run_case(case, args, collector.grpc_target)
            profiled = result.get("profile")
            extra = (f"; per step, gradwatch's hooks: kernels {profiled['kernel_us']:.0f} us "
                     f"of {profiled['step_kernel_us']:.0f} us, host {profiled['host_us']:.0f} us"
                     if profiled else "")
            ratios = "; ".join(f"{variant} {ratio:.3f} (per-round IQR {low:.3f}-{high:.3f})"
                               for variant, (ratio, low, high) in result["ratios"].items())
            print(f"{case:<14} params={result['variables']:<4} plain {result['ms']['plain']:8.2f}"
                  f" ms; ratios to plain: {ratios}{extra}; all acknowledged: "
                  f"{result['acknowledged']}", flush=True)


if __name__ == "__main__":
    main()
