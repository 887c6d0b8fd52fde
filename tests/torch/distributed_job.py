"""A 2-rank job under torchrun (gloo, CPU) for tests/torch/test_distributed.py.

    python -m torch.distributed.run --nproc-per-node 2 ... distributed_job.py MODE

MODE: ``unused`` (DDP, a layer never called, find_unused_parameters=False: DDP raises at
the second step), ``unused-found`` (the same with find_unused_parameters=True), ``nan``
(DDP with find_unused_parameters=True; rank 1's loss turns NaN at step 1), ``fsdp2``
(fully_shard; rank 0 prints the whole gradients' norms as JSON), ``fsdp1`` (the same with
FSDP1, ``use_orig_params=True``), ``tensor-parallel`` (``hidden`` column-wise, ``out``
row-wise: its bias replicated; the same JSON), ``no-sync`` (DDP gradient
accumulation: 4 micro-batches of the rank's own data, the first 3 under ``no_sync()``;
each rank prints the norm of its accumulated gradients as DDP never saw them, from a
plain copy of the model), ``synced-accumulation`` (the same without ``no_sync()``: every
micro-batch all-reduced), ``two-optimizers`` (SGD over one layer, Adam over another, one
DDP bucket holding both, after a batch dropped once backpropagated; each rank prints its
own gradients' norm per optimizer, from a plain copy), ``join`` (uneven inputs under
``Join``, two epochs), ``join-zero`` (the same with a ``ZeroRedundancyOptimizer``). FSDP1
clips with its own ``clip_grad_norm_``. The agent is configured by GRADWATCH_* variables;
the job name comes from torchrun's run id.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys

import torch
import torch.distributed as dist

from gradwatch.agent.torch import GradientMonitor


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = torch.nn.Linear(4, 8)
        self.out = torch.nn.Linear(8, 3)
        self.unused = torch.nn.Linear(8, 8)  # its bias shaped like hidden's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


def main(mode: str) -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = Net()
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.hidden)
        fully_shard(model)  # out and unused in the root's group
    elif mode == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(model, use_orig_params=True,
                                         device_id=torch.device("cpu"))
    elif mode == "tensor-parallel":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        parallelize_module(model, init_device_mesh("cpu", (2,)),
                           {"hidden": ColwiseParallel(), "out": RowwiseParallel()})
    else:
        model = torch.nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=mode != "unused")
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(3))
    if mode in ("no-sync", "synced-accumulation"):
        return accumulate(model, rank, synced=mode == "synced-accumulation")
    if mode == "two-optimizers":
        return two_optimizers(model, rank)
    if mode in ("join", "join-zero"):
        return join(model, rank, zero=mode == "join-zero")
    status = 0
    with GradientMonitor(flush_interval_s=0.05) as monitor:
        optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 1e-2), model)
        try:
            for step in range(3):
                optimizer.zero_grad()
                loss = model(x).pow(2).mean()
                if mode == "nan" and rank == 1 and step == 1:
                    loss = loss * float("nan")
                loss.backward()
                if mode in ("fsdp2", "fsdp1", "tensor-parallel") and step == 2:
                    norms = whole_norms(model)
                    if rank == 0:
                        print("NORMS " + json.dumps(norms), flush=True)
                if mode == "fsdp1":
                    model.clip_grad_norm_(1e-3)  # FSDP1's own: the norms are those before
                optimizer.step()
        except RuntimeError as error:  # DDP's own complaint about unused parameters
            print(f"rank {rank} DDP raised: {str(error).splitlines()[0]}", flush=True)
            status = 3
    if not monitor.close():  # the tests read the collector after the job: all must be in
        print(f"rank {rank}: gradwatch did not deliver everything", flush=True)
        status = 4
    dist.destroy_process_group()
    return status


def whole_norms(model: torch.nn.Module) -> dict[str, float]:
    """Each parameter's whole gradient norm from every rank's part (all ranks call it):
    a DTensor's (FSDP2, tensor parallel) in full; FSDP1's flat slices, each rank's (its
    .grad None where it holds none of the parameter) summed as squares."""
    norms = {}
    for name, p in model.named_parameters():
        name = name.replace("_fsdp_wrapped_module.", "")  # FSDP1's wrapper, unnamed by us
        if hasattr(p.grad, "full_tensor"):
            norms[name] = float(p.grad.full_tensor().norm())
        elif not hasattr(p, "full_tensor"):  # (a DTensor without gradient has none anywhere)
            square_and_ranks = (torch.zeros(2, dtype=torch.float64) if p.grad is None else
                                torch.stack([p.grad.double().pow(2).sum(), torch.ones(())]))
            dist.all_reduce(square_and_ranks)
            if square_and_ranks[1] > 0:
                norms[name] = float(square_and_ranks[0].sqrt())
    return norms


def accumulate(model: torch.nn.parallel.DistributedDataParallel, rank: int,
               synced: bool = False) -> int:
    """4 micro-batches, the first 3 under ``no_sync()`` unless ``synced`` (then each is
    all-reduced); prints the rank's own accumulated norm (LOCAL) and the applied one."""
    plain = copy.deepcopy(model.module)
    data = torch.Generator().manual_seed(rank)
    batches = [torch.randn(8, 4, generator=data) for _ in range(4)]
    for x in batches:
        plain(x).pow(2).mean().backward()
    local = sum(float(p.grad.norm()) ** 2 for p in plain.parameters() if p.grad is not None)
    print(f"LOCAL {rank} {local ** 0.5!r}", flush=True)
    with GradientMonitor(flush_interval_s=0.05) as monitor:
        optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 1e-2), model)
        optimizer.zero_grad()
        for i, x in enumerate(batches):
            with model.no_sync() if i < 3 and not synced else contextlib.nullcontext():
                model(x).pow(2).mean().backward()
        applied = sum(float(p.grad.norm()) ** 2 for p in model.parameters()
                      if p.grad is not None)
        print(f"APPLIED {rank} {applied ** 0.5!r}", flush=True)
        optimizer.step()
    delivered = monitor.close()
    dist.destroy_process_group()
    return 0 if delivered else 4


def two_optimizers(model: torch.nn.parallel.DistributedDataParallel, rank: int) -> int:
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(rank))
    plain = copy.deepcopy(model.module)
    plain(x).pow(2).mean().backward()
    local = {name: sum(float(p.grad.norm()) ** 2 for p in layer.parameters()) ** 0.5
             for name, layer in (("SGD", plain.hidden), ("Adam", plain.out))}
    print("LOCAL " + json.dumps({"rank": rank, **local}), flush=True)
    with GradientMonitor(flush_interval_s=0.05) as monitor:
        optimizers = [monitor.wrap(torch.optim.SGD(model.module.hidden.parameters(), 1e-2),
                                   model),
                      monitor.wrap(torch.optim.Adam(model.module.out.parameters(), 1e-2), model)]
        model(-x).pow(3).mean().backward()  # a batch dropped after its backward pass
        for optimizer in optimizers:
            optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        for optimizer in optimizers:
            optimizer.step()
    delivered = monitor.close()
    dist.destroy_process_group()
    return 0 if delivered else 4


def join(model: torch.nn.parallel.DistributedDataParallel, rank: int, zero: bool) -> int:
    """The Join tutorial's uneven inputs, two epochs: rank 0 trains on 1 batch an epoch,
    rank 1 on 3, gradients zeroed after each step; with a ``ZeroRedundancyOptimizer``
    (``zero``), whose join hook steps it on rank 0 while rank 1 goes on. Each rank prints
    its own gradients' norm at its last step, from a plain copy (LOCAL)."""
    from torch.distributed.algorithms.join import Join
    from torch.distributed.optim import ZeroRedundancyOptimizer

    data = torch.Generator().manual_seed(rank)
    batches = [torch.randn(8, 4, generator=data) for _ in range(1 + 2 * rank)]
    with GradientMonitor(flush_interval_s=0.05) as monitor:
        if zero:
            inner = ZeroRedundancyOptimizer(model.parameters(),
                                            optimizer_class=torch.optim.SGD, lr=1e-2)
        else:
            inner = torch.optim.SGD(model.parameters(), 1e-2)
        optimizer = monitor.wrap(inner, model)
        for epoch in range(2):
            with Join([model, inner] if zero else [model]):
                for x in batches:
                    if epoch == 1 and x is batches[-1]:
                        plain = copy.deepcopy(model.module)
                        plain(x).pow(2).mean().backward()
                        local = sum(float(p.grad.norm()) ** 2 for p in plain.parameters()
                                    if p.grad is not None)
                        print(f"LOCAL {rank} {local ** 0.5!r}", flush=True)
                    model(x).pow(2).mean().backward()
                    optimizer.step()
                    optimizer.zero_grad()
    delivered = monitor.close()
    dist.destroy_process_group()
    return 0 if delivered else 4


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
