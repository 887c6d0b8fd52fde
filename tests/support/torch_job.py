"""A small PyTorch model trained step by step on fixed data, with or without gradwatch, so a
test can compare the weights a watched run ends with to an unwatched one. Imports only torch
(subprocesses import it too)."""

from __future__ import annotations

import time
from typing import Any

import torch

X = torch.linspace(-1.0, 1.0, 64).reshape(16, 4)
Y = X.sum(dim=1, keepdim=True) - X[:, :1] * X[:, 3:]


class TorchJob:
    """Two linear layers and SGD; ``monitor`` (a PyTorch `GradientMonitor`, or None for a
    run without gradwatch) wraps the optimizer."""

    def __init__(self, monitor: Any = None) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
                                         torch.nn.Linear(8, 1))
        optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05)
        self.optimizer = optimizer if monitor is None else monitor.wrap(optimizer, self.model)
        self.steps = 0

    def train(self, steps: int, pause_s: float = 0.0) -> None:
        """``steps`` optimizer steps, sleeping ``pause_s`` after each."""
        for _ in range(steps):
            self.optimizer.zero_grad()
            torch.nn.functional.mse_loss(self.model(X), Y).backward()
            self.optimizer.step()
            self.steps += 1
            if pause_s:
                time.sleep(pause_s)

    def weights(self) -> list[list[float]]:
        """Every parameter, flattened (exact floats: compare with ==)."""
        return [p.detach().flatten().tolist() for p in self.model.parameters()]


def reference_weights(steps: int) -> list[list[float]]:
    """The weights after ``steps`` steps without gradwatch."""
    job = TorchJob()
    job.train(steps)
    return job.weights()
