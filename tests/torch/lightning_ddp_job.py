"""A PyTorch Lightning script as users run it (``python train.py``), for
tests/torch/test_distributed.py: ``Trainer(strategy="ddp", devices=2)`` on the CPU starts
the second rank itself by running this script again. The model has a layer that is never
called (Lightning's ``ddp_find_unused_parameters_true``, or DDP stops at the second
step); the monitor is made in ``configure_optimizers``, in each rank, and given the DDP
module (docs/pytorch.md), so that each rank's gradients are measured before the
all-reduce.

    python lightning_ddp_job.py
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from gradwatch.agent.torch import GradientMonitor


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = torch.nn.Linear(4, 8)
        self.out = torch.nn.Linear(8, 1)
        self.unused = torch.nn.Linear(8, 1)
        self.monitor: GradientMonitor | None = None

    def training_step(self, batch, batch_index):
        x, y = batch
        return torch.nn.functional.mse_loss(self.out(torch.relu(self.hidden(x))), y)

    def configure_optimizers(self):
        self.monitor = GradientMonitor(flush_interval_s=0.05)
        return self.monitor.wrap(torch.optim.SGD(self.parameters(), 1e-2),
                                 self.trainer.strategy.model)

    def on_train_end(self) -> None:
        assert self.monitor.close(timeout_s=10)


if __name__ == "__main__":
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0)) * torch.arange(32)[:, None]
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=2,
                         strategy="ddp_find_unused_parameters_true", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(Regression(), torch.utils.data.DataLoader(data, batch_size=8))
