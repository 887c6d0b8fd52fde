"""The PyTorch demo's training job: DistributedDataParallel over 2 CPU processes (gloo),
run by torchrun, with two classic gradient breaks.

* the ``price`` head's output is detached before the loss ("it is only a logged
  estimate"), so the head and nothing else loses its gradient;
* the ``unused_projection`` layer is built but never called.

Everything else trains, DDP runs with ``find_unused_parameters=True`` so it does not
complain, and the loss goes down: the silent kind of failure. Configured by GRADWATCH_*
variables; run as ``python -m torch.distributed.run --nproc-per-node 2 -m
gradwatch.demo.torch_training``.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from gradwatch.agent.torch import GradientMonitor


class BrokenModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Linear(16, 32)
        self.category = torch.nn.Linear(32, 4)
        self.price = torch.nn.Linear(32, 1)
        self.unused_projection = torch.nn.Linear(32, 8)  # built, never called: no gradient

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.trunk(x))
        # The price estimate is only logged... but it also goes into the loss, detached.
        return self.category(h), self.price(h).detach()


def make_data(n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=generator)
    category = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    price = 10 * x[:, 2:4].sum(dim=1, keepdim=True)
    return x, category, price


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(BrokenModel(),
                                                      find_unused_parameters=True)
    x, category, price = make_data()
    shard = slice(rank, None, world)  # each rank its part of the data
    with GradientMonitor() as monitor:
        optimizer = monitor.wrap(torch.optim.Adam(model.parameters(), 1e-2), model)
        for epoch in range(args.epochs):
            for batch in range(0, len(x[shard]), 64):
                rows = slice(batch, batch + 64)
                optimizer.zero_grad()
                logits, estimate = model(x[shard][rows])
                loss = (torch.nn.functional.cross_entropy(logits, category[shard][rows])
                        + torch.nn.functional.mse_loss(estimate, price[shard][rows]))
                loss.backward()
                optimizer.step()
            if rank == 0:
                print(f"Epoch {epoch + 1}/{args.epochs} - loss: {loss.item():.4f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
