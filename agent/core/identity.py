"""Who is reporting: training job, task and process.

Precedence for each field: the monitor's settings (argument, then ``GRADWATCH_*``),
the launcher's environment (``TF_CONFIG`` for TensorFlow, torchrun's ``RANK`` and
``TORCHELASTIC_RUN_ID`` for PyTorch: each front end names its own), Kubernetes'
``JOB_COMPLETION_INDEX`` (set in Indexed Jobs, e.g. by JobSet), then a default that
works on a laptop (task ``worker`` 0, job named after the script). On Kubernetes,
map the training operator's pod labels to ``GRADWATCH_*`` with the Downward API
(deploy/kubernetes/agent-env.yaml); ``POD_NAME`` names the host if set.

Reads only environment variables: no framework is imported here.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gradwatch.agent.core.settings import AgentSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Identity:
    training_job: str
    task_type: str
    task_index: int
    hostname: str
    pid: int


@dataclass(frozen=True)
class LaunchedTask:
    """What a launcher's environment says about this process (None: it says nothing)."""

    training_job: str | None = None
    task_type: str | None = None
    task_index: int | None = None


#: Reads one launcher's environment variables.
Launcher = Callable[[Mapping[str, str]], LaunchedTask]


def tf_config(environ: Mapping[str, str]) -> LaunchedTask:
    """``TF_CONFIG``'s task (tf.distribute's multi-worker launchers, Kubeflow TFJob)."""
    raw = environ.get("TF_CONFIG")
    if not raw:
        return LaunchedTask()
    try:
        task = json.loads(raw).get("task", {})
        index = task.get("index")
        return LaunchedTask(task_type=task.get("type") or None,
                            task_index=None if index is None else int(index))
    except (ValueError, TypeError, AttributeError):
        log.warning("gradwatch: ignoring unparsable TF_CONFIG")
        return LaunchedTask()


def torchrun(environ: Mapping[str, str]) -> LaunchedTask:
    """torchrun's (torch.distributed.elastic's) ``RANK`` and ``TORCHELASTIC_RUN_ID``."""
    rank = environ.get("RANK", "")
    run_id = environ.get("TORCHELASTIC_RUN_ID", "")
    return LaunchedTask(
        training_job=run_id if run_id and run_id != "none" else None,
        task_type="worker" if rank.isdigit() else None,
        task_index=int(rank) if rank.isdigit() else None)


def _default_job_name() -> str:
    script = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else ""
    return script if script and script not in ("-c", "-m", "") else "default"


def resolve_identity(settings: AgentSettings, launchers: Sequence[Launcher] = (),
                     environ: Mapping[str, str] | None = None) -> Identity:
    """The identity ``settings`` and the environment give (see the module docstring)."""
    environ = os.environ if environ is None else environ
    launched = [launcher(environ) for launcher in launchers]
    k8s_index = environ.get("JOB_COMPLETION_INDEX", "")

    def first(values: list) -> object:
        return next((v for v in values if v is not None), None)

    task_index = first([settings.task_index, *(t.task_index for t in launched),
                        int(k8s_index) if k8s_index.isdigit() else None])
    return Identity(
        training_job=first([settings.training_job, *(t.training_job for t in launched)])
        or _default_job_name(),
        task_type=first([settings.task_type, *(t.task_type for t in launched)]) or "worker",
        task_index=0 if task_index is None else int(task_index),
        hostname=environ.get("POD_NAME") or socket.gethostname(),
        pid=os.getpid(),
    )
