"""The PyTorch front end: optimizer hooks, device-side statistics without host
synchronisation, a DDP communication hook measuring each rank before the all-reduce,
and FSDP shards. Never imports TensorFlow."""

from gradwatch.agent.torch.monitor import GradientMonitor

__all__ = ["GradientMonitor"]
