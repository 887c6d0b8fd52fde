"""Who is reporting: training job, task and process.

Precedence for each field: the monitor's settings (argument, then ``GRADWATCH_*``),
the launcher's environment (``TF_CONFIG`` for TensorFlow, torchrun's ``RANK`` and
``TORCHELASTIC_RUN_ID`` for PyTorch: each front end names its own), Kubernetes'
``JOB_COMPLETION_INDEX`` (set in Indexed Jobs, e.g. by JobSet), then a default that
works on a laptop (task ``worker`` 0, job named after the script). On Kubernetes,
map the training operator's pod labels to ``GRADWATCH_*`` with the Downward API
(deploy/kubernetes/agent-env.yaml); ``POD_NAME`` names the host if set.

A launcher's value that cannot be reported (not an index, a name with control
characters, unparsable ``TF_CONFIG``) is ignored, all of them said in one log line:
identity never fails. Reads only environment variables: no framework is imported here.
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

from gradwatch.agent.core.settings import (
    AgentSettings,
    parse_label,
    parse_task_index,
    shown,
)

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
    """What a launcher's environment says about this process (None: it says nothing);
    ``ignored``: what it says that cannot be used, one phrase each."""

    training_job: str | None = None
    task_type: str | None = None
    task_index: int | None = None
    ignored: tuple[str, ...] = ()


#: Reads one launcher's environment variables.
Launcher = Callable[[Mapping[str, str]], LaunchedTask]


def _checked(parse: Callable[[object], object], value: object, where: str,
             ignored: list[str]) -> object:
    """``parse(value)``, or None (and why, in ``ignored``) if it refuses it."""
    if value is None:
        return None
    try:
        return parse(value)
    except ValueError as error:
        ignored.append(f"{where} = {shown(value, 40)} ({error})")
        return None


def tf_config(environ: Mapping[str, str]) -> LaunchedTask:
    """``TF_CONFIG``'s task (tf.distribute's multi-worker launchers, Kubeflow TFJob)."""
    raw = environ.get("TF_CONFIG")
    if not raw:
        return LaunchedTask()
    try:
        task = json.loads(raw).get("task", {})
        if not isinstance(task, dict):
            raise TypeError
    except (ValueError, TypeError, AttributeError, RecursionError):
        return LaunchedTask(ignored=("TF_CONFIG (not JSON with a \"task\" object)",))
    ignored: list[str] = []
    return LaunchedTask(
        task_type=_checked(parse_label, task.get("type") or None, "TF_CONFIG task.type",
                           ignored),
        task_index=_checked(parse_task_index, task.get("index"), "TF_CONFIG task.index",
                            ignored),
        ignored=tuple(ignored))


def torchrun(environ: Mapping[str, str]) -> LaunchedTask:
    """torchrun's (torch.distributed.elastic's) ``RANK`` and ``TORCHELASTIC_RUN_ID``."""
    ignored: list[str] = []
    rank = _checked(parse_task_index, environ.get("RANK") or None, "RANK", ignored)
    run_id = environ.get("TORCHELASTIC_RUN_ID") or None
    return LaunchedTask(
        training_job=_checked(parse_label, run_id if run_id != "none" else None,
                              "TORCHELASTIC_RUN_ID", ignored),
        task_type="worker" if rank is not None else None,
        task_index=rank, ignored=tuple(ignored))


def _default_job_name() -> str:
    script = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else ""
    return script if script and script not in ("-c", "-m", "") else "default"


def resolve_identity(settings: AgentSettings, launchers: Sequence[Launcher] = (),
                     environ: Mapping[str, str] | None = None, *,
                     report: bool = True) -> Identity:
    """The identity ``settings`` and the environment give (see the module docstring);
    what was ignored is logged in one line (unless ``report`` is False)."""
    environ = os.environ if environ is None else environ
    launched = [launcher(environ) for launcher in launchers]
    ignored = [phrase for task in launched for phrase in task.ignored]
    k8s_index = _checked(parse_task_index, environ.get("JOB_COMPLETION_INDEX") or None,
                         "JOB_COMPLETION_INDEX", ignored)
    pod_name = _checked(parse_label, environ.get("POD_NAME") or None, "POD_NAME", ignored)
    if ignored and report:
        log.warning("gradwatch: ignoring what the launcher says: %s", "; ".join(ignored))

    def first(values: list) -> object:
        return next((v for v in values if v is not None), None)

    task_index = first([settings.task_index, *(t.task_index for t in launched), k8s_index])
    return Identity(
        training_job=first([settings.training_job, *(t.training_job for t in launched)])
        or _default_job_name(),
        task_type=first([settings.task_type, *(t.task_type for t in launched)]) or "worker",
        task_index=0 if task_index is None else int(task_index),
        hostname=pod_name or socket.gethostname(),
        pid=os.getpid(),
    )
