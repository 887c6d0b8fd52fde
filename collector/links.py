"""Where an alert sends on-call: the job dashboard's panel that answers it.

``dashboards/generate.py`` gives these panels these ids, and a unit test checks that the
generated JSON has them, so a ``dashboard_url`` annotation always opens a real panel.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlencode

#: The job dashboard (``dashboards/gradwatch-job.json``): its uid and URL slug.
JOB_DASHBOARD_UID = "gradwatch-job"
JOB_DASHBOARD_SLUG = "gradwatch-job"

#: Alert name → id of the job dashboard's panel that answers "which variable, which
#: task, since when, why" for it (ids 101 and up are reserved for these panels).
ALERT_PANELS: dict[str, int] = {
    "GradientMissing": 101,  # Why gradients are missing (variable, cause, op, source line)
    "GradientNonFinite": 102,  # Non-finite steps by task
    "GradientExploding": 103,  # Top 10 variables by gradient norm
    "GradientVanishing": 104,  # Bottom 10 variables by gradient norm
    "ReplicaDivergence": 105,  # Replicas furthest from the median norm
    "WorkerSilent": 106,  # Tasks (host, pod, pid, report age, step lag)
}


def dashboard_url(base_url: str, labels: Mapping[str, str]) -> str:
    """The job dashboard for an alert's job and optimizer, opened on the alert's panel
    (``viewPanel``; Esc shows the whole dashboard); ``base_url`` is Grafana's root URL."""
    query = {"var-training_job": labels.get("training_job", ""),
             "var-optimizer": labels.get("optimizer", "")}
    panel = ALERT_PANELS.get(labels.get("alertname", ""))
    if panel is not None:
        query["viewPanel"] = str(panel)
    return (f"{base_url.rstrip('/')}/d/{JOB_DASHBOARD_UID}/{JOB_DASHBOARD_SLUG}?"
            + urlencode(query))
