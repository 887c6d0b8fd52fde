"""What every front end's ``GradientMonitor`` shares: settings, identity, the sender,
the sessions and their diagnoses, and closing at exit.

A front end subclasses `MonitorCore`, names its launchers (where its identity comes
from), creates sessions (`Session` with its own `StepSource`) and hands them to
`adopt`. An invalid setting disables the monitor with one log line: a
misconfigured gradwatch never stops training.

Thread-safety: the public methods are called from the training thread; `adopt`
and `add_diagnosis` may be called from any thread (traces, merge calls).
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any, ClassVar

from gradwatch.agent.core import forking
from gradwatch.agent.core.channel import ChannelSettings
from gradwatch.agent.core.diagnosis import Diagnosis
from gradwatch.agent.core.identity import Identity, Launcher, resolve_identity
from gradwatch.agent.core.sender import Sender
from gradwatch.agent.core.session import Session
from gradwatch.agent.core.settings import AgentSettings, SettingsError

log = logging.getLogger(__name__)

#: The open monitor of each front end and task in this process (`MonitorCore._take_over`).
_open: dict[tuple, MonitorCore] = {}
_open_lock = threading.Lock()


def optimizer_base_name(optimizer: Any) -> str:
    """What ``optimizer`` reports as before names are made unique: its ``name`` (Keras;
    tf-keras's legacy optimizers keep it as ``_name``), else its class name."""
    return str(getattr(optimizer, "name", None) or getattr(optimizer, "_name", None)
               or type(optimizer).__name__)


class MonitorCore:
    """Settings (arguments win over ``GRADWATCH_*``; see `AgentSettings`), identity, and
    one background `Sender` for all of this process's sessions."""

    #: Where the launcher says who this process is, in order of precedence.
    launchers: ClassVar[Sequence[Launcher]] = ()

    def __init__(self, **arguments: Any) -> None:
        self._sender: Sender | None = None
        self._closed = False
        self._open_key: tuple = ()  # set by `_take_over`
        self._delivered = False  # what the first close() found
        self._lock = threading.Lock()
        self._sessions: dict[Hashable, Session] = {}
        self._failed: set[Hashable] = set()
        self._names: dict[Hashable, str] = {}
        #: Sessions ended by `release`, by name: the next session of the name follows each.
        self._released: dict[str, Session] = {}
        #: Diagnoses seen so far, by the variable's id(), with a weak reference to it (a model
        #: dropped must go; a dead one's id may be reused): sessions created later get them.
        self._diagnoses: dict[int, tuple[Callable[[], Any], str, Diagnosis]] = {}
        try:
            self.settings = AgentSettings.resolve(**arguments)
        except SettingsError as error:
            log.error("gradwatch: disabled, invalid settings: %s", error)
            self.settings = AgentSettings(enabled=False)
        self.enabled = self.settings.enabled
        for name, meant in AgentSettings.misspelt_variables().items():
            log.warning("gradwatch: %s is not a setting (ignored); did you mean %s?", name,
                        meant)
        self.identity: Identity = resolve_identity(self.settings, self.launchers,
                                                   report=self.enabled)
        if self.enabled and forking.streaming_parent() is not None:
            log.error("gradwatch: disabled: this process was forked from process %d after "
                      "gradwatch streamed there, and gRPC cannot connect from such a child; "
                      "start it with the 'spawn' or 'forkserver' method, or fork before "
                      "the parent's first monitor connects",
                      forking.streaming_parent())
            self.enabled = False
        if not self.enabled:
            return
        channel = ChannelSettings.of(self.settings)
        if (channel.token or channel.token_file) and not channel.secure:
            log.warning("gradwatch: sending a token without TLS; anyone on the network path "
                        "can read it")
        forking.watch(self)
        try:
            self._sender = Sender(self.settings, self.identity.training_job)
        except Exception as error:  # e.g. no thread can be started: never stop training
            log.error("gradwatch: disabled, cannot start: %s: %s", type(error).__name__, error)
            self.enabled = False
            return
        atexit.register(self.close)
        self._take_over()

    @property
    def collector(self) -> str:
        return self.settings.collector

    def close(self, timeout_s: float = 5.0) -> bool:
        """Flushes buffered statistics (waiting at most ``timeout_s``) and stops.
        Returns True if the collector acknowledged everything (a disabled monitor: True;
        a later call: what the first one found)."""
        if self._sender is None:
            return True
        if not self._closed:
            self._closed = True
            with _open_lock:
                if _open.get(self._open_key) is self:
                    del _open[self._open_key]
            atexit.unregister(self.close)
            self._on_close()
            self._delivered = self._sender.close(timeout_s)
            with self._lock:  # nothing is sent any more: the variables may go
                self._sessions.clear()
                self._released.clear()
                self._diagnoses.clear()
        return self._delivered

    def _take_over(self) -> None:
        """One open monitor per front end and task in this process: a new one closes the
        one before (a notebook cell run again). Two would report the same optimizer
        names for one task, and each session would keep replacing the other's at the
        collector."""
        identity = self.identity
        self._open_key = (type(self), identity.training_job, identity.task_type,
                          identity.task_index)
        with _open_lock:
            previous, _open[self._open_key] = _open.get(self._open_key), self
        if previous is not None and not previous._closed:
            log.warning("gradwatch: a new monitor for %s (%s:%d) replaces the one open in "
                        "this process, which is closed; wrap the optimizer with the new one",
                        identity.training_job, identity.task_type, identity.task_index)
            previous.close(timeout_s=1.0)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _on_close(self) -> None:
        """Front-end clean-up before the last flush (e.g. removing hooks)."""

    def after_fork_in_child(self) -> None:
        """In a forked child (`forking`): switched off for good, as if closed, without
        touching the sender (its thread stayed in the parent; finalising its gRPC objects
        here could crash) and without taking a lock another thread may have held at the
        fork. ``close`` then returns True: nothing of this process is pending."""
        self.enabled = False
        self._closed = True
        self._delivered = True
        atexit.unregister(self.close)
        try:
            self._on_fork_in_child()
        except Exception:  # never break the child
            pass

    def _on_fork_in_child(self) -> None:
        """Front-end part of `after_fork_in_child`: lock-free, e.g. stopping a recorder."""

    # -- for front ends -----------------------------------------------------------------

    def optimizer_name(self, optimizer: Any) -> str:
        """A name for ``optimizer`` unique within this process: its ``name`` (Keras) or
        class name, with ``_2``, ``_3`` ... for further ones."""
        return self.unique_name(id(optimizer), optimizer_base_name(optimizer))

    def unique_name(self, key: Hashable, base: str) -> str:
        """The optimizer name ``key`` reports under, the same at every call: ``base``, or
        ``base_2``, ``base_3`` ... where another key of this process holds it. A collector
        knows a task's session by this name: two sessions sharing it would keep replacing
        each other there. Takes `session_lock`."""
        with self._lock:
            name = self._names.get(key)
            if name is None:
                taken = set(self._names.values())
                name, n = base, 1
                while name in taken:
                    n += 1
                    name = f"{base}_{n}"
                self._names[key] = name
            return name

    def pass_name(self, key: Hashable, successor: Hashable) -> str:
        """Gives ``key``'s optimizer name to ``successor`` (an optimizer that replaces
        another: its sessions continue the other's at the collector). Takes
        `session_lock`."""
        with self._lock:
            name = self._names.pop(key)
            self._names[successor] = name
            return name

    def adopt(self, key: Hashable, session: Session) -> None:
        """Starts shipping ``session`` (created by the caller for ``key``) and gives it the
        diagnoses known so far (any thread; call under `session_lock`). A second session
        for ``key`` continues the first (the same optimizer, more variables): the first
        ends once its steps are delivered, then this one replaces it at the collector; so
        does the first session of a name after a `release`d one. Logged, unless it
        continues ``key``'s session (the front end says what changed)."""
        regrouped = key in self._sessions
        session.predecessor = (self._sessions.get(key)
                               or self._released.pop(session.optimizer, None))
        self._sessions[key] = session
        self._diagnoses = {k: d for k, d in self._diagnoses.items() if d[0]() is not None}
        for key, (_, name, diagnosis) in self._diagnoses.items():
            session.add_diagnosis(key, name, diagnosis)
        self._sender.add_session(session)
        log.log(logging.DEBUG if regrouped else logging.INFO,
                "gradwatch: watching %d variables of %s x %d replicas (%s, %s:%d) -> %s",
                session.num_variables, session.optimizer, session.num_replicas,
                self.identity.training_job, self.identity.task_type,
                self.identity.task_index, self.collector)

    def session_of(self, key: Hashable) -> Session | None:
        """``key``'s current session, if any (call under `session_lock`)."""
        return self._sessions.get(key)

    def release(self, key: Hashable, name_key: Hashable | None) -> None:
        """``key``'s optimizer (named by ``name_key``, if that is still its) is gone: its
        session ends once what it recorded is delivered, telling the collector so; its
        name is free for the next optimizer, and what was kept of its variables goes (any
        thread; a sweep of models trained one after another in one process frees each in
        turn)."""
        with self._lock:
            session = self._sessions.pop(key, None)
            if name_key is not None:
                self._names.pop(name_key, None)
            if session is None:
                return
            kept = set().union(*(s.variable_keys() for s in self._sessions.values()))
            for gone in session.variable_keys() - kept:
                self._diagnoses.pop(gone, None)
            # (its name's next session registers once this one said goodbye)
            self._released[session.optimizer] = session
        session.close()

    @property
    def session_lock(self) -> threading.Lock:
        return self._lock

    def add_diagnosis(self, variable: Any, name: str, diagnosis: Diagnosis) -> None:
        """``variable`` (called ``name``) gets no gradient, and this is why (any thread,
        often while tracing)."""
        with self._lock:  # (a dead variable's entry goes at the next `adopt`, or when its
            # id is reused by a variable diagnosed in turn)
            self._diagnoses[id(variable)] = (_reference(variable), name, diagnosis)
            sessions = list(self._sessions.values())
        for session in sessions:
            session.add_diagnosis(id(variable), name, diagnosis)


def _reference(value: Any) -> Callable[[], Any]:
    """A weak reference to ``value``, or a strong one where it takes no weak references."""
    try:
        return weakref.ref(value)
    except TypeError:
        return lambda: value
