"""CPU time of threads and processes, for the benchmarks (Linux ``/proc``)."""

from __future__ import annotations

import os
import threading


def cpu_s(task: str) -> float:
    """CPU seconds a thread (``self/task/TID``) or a process's main thread (``PID``) has
    run, in nanoseconds' resolution (Linux ``/proc/.../schedstat``), 0 if unreadable."""
    try:
        with open(f"/proc/{task}/schedstat") as schedstat:
            return int(schedstat.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def process_cpu_s(pid: int) -> float:
    """CPU seconds all threads of process ``pid`` have run (see `cpu_s`)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    return sum(cpu_s(f"{pid}/task/{tid}") for tid in tasks)


def sender_task() -> str:
    """The sender thread's ``/proc`` task ("" if there is none)."""
    for thread in threading.enumerate():
        if thread.name == "gradwatch-sender" and thread.native_id is not None:
            return f"self/task/{thread.native_id}"
    return ""
