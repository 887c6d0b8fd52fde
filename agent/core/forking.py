"""Keeping a forked child of a monitored process safe: DataLoader workers, multiprocessing
pools and tf-keras's ``use_multiprocessing`` fork the training process.

gRPC's own fork handlers crash such a child (SIGSEGV in the child's post-fork handler)
when the fork comes while another thread is in a call, as the sender's stream always
is (grpc/grpc#13998, #31885). The child never uses the parent's channel, so gradwatch
turns those handlers off (``GRPC_ENABLE_FORK_SUPPORT=0``, which gRPC reads when it is
imported) unless the environment already says otherwise; where gRPC was imported
first, the first monitor says so once. In the child every monitor inherited from the
parent is switched off without touching its gRPC objects: the sender thread did not
come along. A monitor created in the child watches that process, unless gradwatch had
streamed in the parent before it forked: gRPC's asyncio runtime, which gradwatch keeps up
once started (`channel.hold_grpc_runtime`), then came along without its thread, and a
channel made in the child never connects, so such a monitor disables itself with one line
(`streaming_parent`).
"""

from __future__ import annotations

import logging
import os
import sys
import weakref
from typing import Protocol

log = logging.getLogger(__name__)

#: gRPC reads the variable when it is imported: this module is imported (by the package's
#: ``__init__``) before any of ours imports it.
_SET_BEFORE = os.environ.get("GRPC_ENABLE_FORK_SUPPORT")
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
_READ = _SET_BEFORE if "grpc" in sys.modules else os.environ["GRPC_ENABLE_FORK_SUPPORT"]
#: Whether gRPC's fork handlers are on in this process (unset, they are).
FORK_HANDLERS_ON = _READ is None or _READ.strip().lower() not in ("0", "false", "no", "off")


class ForkAware(Protocol):
    def after_fork_in_child(self) -> None:
        """Called in a forked child, in the forking thread, before anything else runs."""


_live: weakref.WeakSet = weakref.WeakSet()
_registered = False
#: The process that started gRPC's asyncio runtime for good (`channel.hold_grpc_runtime`):
#: this one, or in a forked child its parent (or an ancestor), or None.
_runtime_held_by: int | None = None
#: In a forked child: the parent's pid if gradwatch had streamed there before the fork.
_streaming_parent: int | None = None


def grpc_runtime_held() -> None:
    """Notes that gradwatch started gRPC's asyncio runtime in this process (sender thread):
    a child forked from now on inherits it without the thread that runs it."""
    global _runtime_held_by
    _runtime_held_by = os.getpid()


def holds_grpc_runtime() -> bool:
    """Whether gradwatch started gRPC's asyncio runtime in this very process."""
    return _runtime_held_by == os.getpid()


def streaming_parent() -> int | None:
    """The pid of the process this one was forked from after gradwatch had streamed there
    over gRPC (with gRPC's fork handlers off), or None. Such a process cannot open a
    channel that works; its grandchildren inherit the answer."""
    return _streaming_parent


def watch(monitor: ForkAware) -> None:
    """Switches ``monitor`` off in forked children (training thread)."""
    global _registered
    _live.add(monitor)
    if not _registered:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _registered = True
        if FORK_HANDLERS_ON:
            log.warning("gradwatch: gRPC's fork handlers are on (grpc was imported before "
                        "gradwatch, or GRPC_ENABLE_FORK_SUPPORT is set): a child forked while "
                        "gradwatch streams, such as a DataLoader worker, may crash "
                        "(grpc/grpc#13998); import gradwatch first or set "
                        "GRPC_ENABLE_FORK_SUPPORT=0")


def _after_fork_in_child() -> None:
    global _streaming_parent
    for monitor in list(_live):
        monitor.after_fork_in_child()
    _live.clear()
    # (gRPC's own fork handlers, where on, would start the runtime afresh)
    if _runtime_held_by is not None and not FORK_HANDLERS_ON:
        _streaming_parent = os.getppid()
