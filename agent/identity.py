"""Who is reporting: training job, task and process, from arguments and environment.

Precedence for each field: explicit argument, ``GRADWATCH_*`` variable,
``TF_CONFIG`` (task type and index), Kubernetes' ``JOB_COMPLETION_INDEX`` (set
in Indexed Jobs, e.g. by JobSet), then a default that works on a laptop (task
``worker`` 0, job named after the script). On Kubernetes, map the training
operator's pod labels to ``GRADWATCH_*`` with the Downward API
(deploy/kubernetes/agent-env.yaml); ``POD_NAME`` names the host if set.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Identity:
    training_job: str
    task_type: str
    task_index: int
    hostname: str
    pid: int


def _tf_config_task() -> tuple[str | None, int | None]:
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None, None
    try:
        task = json.loads(raw).get("task", {})
        return task.get("type"), int(task["index"]) if "index" in task else None
    except (ValueError, TypeError, AttributeError):
        log.warning("gradwatch: ignoring unparsable TF_CONFIG")
        return None, None


def _default_job_name() -> str:
    script = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else ""
    return script if script and script not in ("-c", "-m", "") else "default"


def resolve_identity(
    training_job: str | None = None,
    task_type: str | None = None,
    task_index: int | None = None,
) -> Identity:
    tf_type, tf_index = _tf_config_task()
    env_index = os.environ.get("GRADWATCH_TASK_INDEX")
    k8s_index = os.environ.get("JOB_COMPLETION_INDEX")
    return Identity(
        training_job=training_job
        or os.environ.get("GRADWATCH_TRAINING_JOB")
        or _default_job_name(),
        task_type=task_type or os.environ.get("GRADWATCH_TASK_TYPE") or tf_type or "worker",
        task_index=(
            task_index if task_index is not None
            else int(env_index) if env_index
            else tf_index if tf_index is not None
            else int(k8s_index) if k8s_index and k8s_index.isdigit()
            else 0
        ),
        hostname=os.environ.get("POD_NAME") or socket.gethostname(),
        pid=os.getpid(),
    )
