"""`GradientMonitor`: the agent's public API.

    monitor = GradientMonitor(collector="127.0.0.1:8470", training_job="my-run")
    optimizer = monitor.wrap(optimizer)   # Keras 3 and tf-keras; model.fit and custom loops
    monitor.observe(grads, variables)     # loops that don't use a wrapped optimizer
    monitor.close()                       # flush; also a context manager

Environment (arguments win): ``GRADWATCH_COLLECTOR``, ``GRADWATCH_TRAINING_JOB``,
``GRADWATCH_TASK_TYPE``, ``GRADWATCH_TASK_INDEX``, ``GRADWATCH_DISABLED=1``,
``GRADWATCH_DIAGNOSE=0``, ``GRADWATCH_MAX_BUFFER_BYTES``, ``GRADWATCH_ACK_TIMEOUT`` and
``GRADWATCH_FAILBACK_INTERVAL`` (seconds; see `gradwatch.agent.sender`), and for security
``GRADWATCH_TLS``, ``GRADWATCH_TLS_CA_FILE``, ``GRADWATCH_TLS_CERT_FILE``,
``GRADWATCH_TLS_KEY_FILE``, ``GRADWATCH_TOKEN``, ``GRADWATCH_TOKEN_FILE``
(see `gradwatch.agent.channel`).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from gradwatch import __version__
from gradwatch.agent import tape
from gradwatch.agent.channel import ChannelSettings
from gradwatch.agent.diagnosis import Diagnosis
from gradwatch.agent.endpoints import parse_targets
from gradwatch.agent.identity import Identity, resolve_identity
from gradwatch.agent.optimizers import wrap_optimizer
from gradwatch.agent.sender import Sender
from gradwatch.agent.session import Session

log = logging.getLogger(__name__)

DEFAULT_COLLECTOR = "127.0.0.1:8470"
#: Host memory for statistics the collector has not acknowledged yet: 10 minutes of a
#: 1,000-variable, one-replica job at 10 steps/s is 6,000 steps x 17 kB = 103 MB.
DEFAULT_MAX_BUFFER_BYTES = 128 * 2**20
_TRUE = ("1", "true", "yes", "on")


def _loss_scale(optimizer: Any) -> Any:
    """The current loss scale of a mixed-precision optimizer (Keras 3 or tf-keras
    ``LossScaleOptimizer``), else None."""
    if "LossScaleOptimizer" not in type(optimizer).__name__:
        return None
    scale = getattr(optimizer, "dynamic_scale", None)  # Keras 3
    if scale is None:
        scale = getattr(optimizer, "loss_scale", None)  # tf-keras
    return None if scale is None else tf.convert_to_tensor(scale)


def _warn_if_known_broken(optimizer: Any) -> None:
    """Says so when the combination cannot train, whatever gradwatch does."""
    strategy = tf.distribute.get_strategy()
    keras3 = type(optimizer).__module__.startswith("keras.")
    if keras3 and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        log.warning(
            "gradwatch: Keras 3 model.fit under MultiWorkerMirroredStrategy fails upstream "
            "('unsupported type PerReplica', keras-team/keras#20585). Custom loops "
            "(strategy.run + optimizer.apply or monitor.observe) and tf-keras model.fit work, "
            "and gradwatch watches them.")


def _versions() -> dict[str, str]:
    versions = {"gradwatch": __version__, "tensorflow": tf.__version__}
    try:
        import keras

        versions["keras"] = keras.__version__
    except ImportError:
        pass
    return versions


class GradientMonitor:
    """Watches gradients of one training process and ships statistics to a collector.

    Thread-safety: `wrap`, `observe` and `close` are called from the training
    thread (``observe`` and wrapped optimizers also from ``tf.function`` traces).
    Network I/O and device→host copies run on one background thread.

    Args:
      collector: ``host:port`` of the collector, a comma-separated list of replicas,
        or ``dns:///name:port`` (``GRADWATCH_COLLECTOR``; see `gradwatch.agent.endpoints`).
      training_job: name shared by all tasks of one run (``GRADWATCH_TRAINING_JOB``).
      task_type, task_index: override ``TF_CONFIG``.
      buffer_steps: on-device ring buffer size per session; steps recorded
        faster than the host drains them are dropped and counted.
      max_buffer_bytes: host memory for statistics not yet acknowledged, across
        sessions (while the collector is away); beyond it the oldest steps are dropped
        and counted. Default 128 MiB (``GRADWATCH_MAX_BUFFER_BYTES``).
      flush_interval_s: how often statistics leave the device.
      enabled: ``False`` (or ``GRADWATCH_DISABLED=1``) makes every method a no-op.
      diagnose: explain missing gradients (``GRADWATCH_DIAGNOSE``, default on): patches
        ``tf.GradientTape`` while the monitor is open; see `gradwatch.agent.tape`.
      tls, tls_ca_file, tls_cert_file, tls_key_file, token, token_file: transport
        security (`gradwatch.agent.channel.ChannelSettings`).

    An invalid setting disables the monitor with an error in the log: a
    misconfigured gradwatch never stops training.
    """

    def __init__(self, collector: str | None = None, training_job: str | None = None, *,
                 task_type: str | None = None, task_index: int | None = None,
                 buffer_steps: int = 256, max_buffer_bytes: int | None = None,
                 flush_interval_s: float = 0.1, enabled: bool | None = None,
                 diagnose: bool | None = None, tls: bool | None = None,
                 tls_ca_file: str | None = None, tls_cert_file: str | None = None,
                 tls_key_file: str | None = None, token: str | None = None,
                 token_file: str | None = None) -> None:
        if enabled is None:
            enabled = os.environ.get("GRADWATCH_DISABLED", "").lower() not in _TRUE
        if diagnose is None:
            diagnose = os.environ.get("GRADWATCH_DIAGNOSE", "1").lower() in _TRUE
        self.enabled = enabled
        self.collector = collector or os.environ.get("GRADWATCH_COLLECTOR") or DEFAULT_COLLECTOR
        self.identity: Identity = resolve_identity(training_job, task_type, task_index)
        self.buffer_steps = buffer_steps
        self._sessions: dict[tuple, Session] = {}
        self._optimizer_names: dict[int, str] = {}
        self._lock = threading.Lock()
        self._failed: set[tuple] = set()
        self._sender: Sender | None = None
        self._closed = False
        self._diagnoses: dict[int, tuple[Any, Diagnosis]] = {}
        self._stop_diagnosing = None
        if not self.enabled:
            return
        env = os.environ.get
        try:
            targets = parse_targets(self.collector)
            channel = ChannelSettings.from_environment(
                tls=tls, ca_file=tls_ca_file, cert_file=tls_cert_file, key_file=tls_key_file,
                token=token, token_file=token_file)
            if max_buffer_bytes is None:
                max_buffer_bytes = int(env("GRADWATCH_MAX_BUFFER_BYTES",
                                           DEFAULT_MAX_BUFFER_BYTES))
            failback_interval_s = float(env("GRADWATCH_FAILBACK_INTERVAL", "30"))
            ack_timeout_s = float(env("GRADWATCH_ACK_TIMEOUT", "10"))
        except ValueError as error:
            self.enabled = False
            log.error("gradwatch: disabled, invalid setting: %s", error)
            return
        if (channel.token or channel.token_file) and not channel.secure:
            log.warning("gradwatch: sending a token without TLS; anyone on the network path "
                        "can read it")
        if diagnose:
            self._stop_diagnosing = tape.listen(self._on_diagnosis)
        self._sender = Sender(targets, self.identity.training_job, channel=channel,
                              flush_interval_s=flush_interval_s,
                              max_buffer_bytes=max_buffer_bytes,
                              failback_interval_s=failback_interval_s,
                              ack_timeout_s=ack_timeout_s)
        atexit.register(self.close)

    # -- public API ---------------------------------------------------------------------

    def wrap(self, optimizer: Any) -> Any:
        """Patches a Keras 3 or tf-keras optimizer in place so each update is observed
        (``None`` gradients included) before it is applied; returns the optimizer."""
        if not self.enabled:
            return optimizer
        _warn_if_known_broken(optimizer)
        return wrap_optimizer(optimizer, self._on_optimizer_gradients, self._on_rejected,
                              self._on_optimizer_built)

    def observe(self, grads: Sequence[Any], variables: Sequence[Any], *,
                step: Any = None, name: str = "observe") -> None:
        """Records one step's gradients for ``variables`` (same order, ``None`` allowed).

        Call it where the gradients are (eagerly, inside ``tf.function``, or in
        replica context); ``step`` defaults to a per-call-site counter.
        """
        if self.enabled:
            self._record(name, list(grads), list(variables), step)

    def close(self, timeout_s: float = 5.0) -> bool:
        """Flushes buffered statistics (waiting at most ``timeout_s``) and stops.
        Returns True if the collector acknowledged everything."""
        if self._closed or self._sender is None:
            return True
        self._closed = True
        atexit.unregister(self.close)
        if self._stop_diagnosing is not None:
            self._stop_diagnosing()
        return self._sender.close(timeout_s)

    def __enter__(self) -> GradientMonitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------

    def _optimizer_name(self, optimizer: Any) -> str:
        with self._lock:
            name = self._optimizer_names.get(id(optimizer))
            if name is None:
                base = str(getattr(optimizer, "name", None) or type(optimizer).__name__)
                taken = set(self._optimizer_names.values())
                name, n = base, 1
                while name in taken:
                    n += 1
                    name = f"{base}_{n}"
                self._optimizer_names[id(optimizer)] = name
            return name

    def _on_optimizer_gradients(self, optimizer: Any, grads: list, variables: list) -> None:
        step = getattr(optimizer, "iterations", None)
        self._record(self._optimizer_name(optimizer), grads, variables,
                     None if step is None else tf.convert_to_tensor(step),
                     loss_scale=_loss_scale(optimizer),
                     loss_scaled="LossScaleOptimizer" in type(optimizer).__name__)

    def _on_optimizer_built(self, optimizer: Any, variables: list) -> None:
        if tf.distribute.in_cross_replica_context() and not self._closed:
            self._session(self._optimizer_name(optimizer), variables,
                          loss_scaled="LossScaleOptimizer" in type(optimizer).__name__)

    def _on_rejected(self, optimizer: Any, grads: list, variables: list, error: Exception) -> None:
        """The optimizer raised (Keras: "No gradients provided for any variable").
        Inside a trace our in-graph record never runs, so report from the host."""
        if not tf.inside_function():
            return
        session = self._sessions.get(self._session_key(self._optimizer_name(optimizer), variables))
        if session is not None:
            with tf.init_scope():
                iterations = getattr(optimizer, "iterations", None)
                step = 0 if iterations is None else int(tf.convert_to_tensor(iterations))
            session.record_on_host(step, grads)
            log.error("gradwatch: %s rejected the update: %s", session.optimizer, error)

    def _on_diagnosis(self, variable: Any, diagnosis: Diagnosis) -> None:
        """A variable got no gradient, and this is why (any thread, often while tracing)."""
        with self._lock:
            self._diagnoses[id(variable)] = (variable, diagnosis)
            sessions = list(self._sessions.values())
        for session in sessions:
            session.add_diagnosis(variable, diagnosis)

    @staticmethod
    def _session_key(name: str, variables: Sequence[Any]) -> tuple:
        return (name, *(id(v) for v in variables))

    def _session(self, name: str, variables: list, loss_scaled: bool = False) -> Session | None:
        """The session for these variables, created on first use (None if that failed).
        In replica context creation goes through ``merge_call``, so all replicas share
        one session; that merge function must never raise, or the other replicas hang."""
        key = self._session_key(name, variables)
        session = self._sessions.get(key)
        if session is not None:
            return session
        if tf.distribute.in_cross_replica_context():
            return self._new_session(tf.distribute.get_strategy(), key, name, variables,
                                     loss_scaled)
        # A closure, not merge_call args: those are regrouped into PerReplica values.
        return tf.distribute.get_replica_context().merge_call(
            lambda strategy: self._new_session(strategy, key, name, variables, loss_scaled))

    def _new_session(self, strategy: tf.distribute.Strategy, key: tuple, name: str,
                     variables: list, loss_scaled: bool = False) -> Session | None:
        with self._lock:
            session = self._sessions.get(key)
            if session is None and key not in self._failed:
                try:
                    session = Session(self.identity, name, variables, self.buffer_steps,
                                      strategy=strategy, versions=_versions(),
                                      loss_scaled=loss_scaled)
                except Exception:  # gradwatch must never break training
                    self._failed.add(key)
                    log.exception("gradwatch: cannot watch %s", name)
                    return None
                self._sessions[key] = session
                for variable, diagnosis in self._diagnoses.values():
                    session.add_diagnosis(variable, diagnosis)
                self._sender.add_session(session)
                log.info("gradwatch: watching %d variables of %s x %d replicas (%s, %s:%d) "
                         "-> %s", len(variables), name, session.num_replicas,
                         self.identity.training_job, self.identity.task_type,
                         self.identity.task_index, self.collector)
        return session

    def _record(self, name: str, grads: list, variables: list, step: Any, *,
                loss_scale: Any = None, loss_scaled: bool = False) -> None:
        if len(grads) != len(variables):
            raise ValueError(f"gradwatch: {len(grads)} gradients for {len(variables)} variables")
        key = self._session_key(name, variables)
        if key in self._failed or self._closed:
            return
        try:
            session = self._session(name, variables, loss_scaled)
            if session is not None:
                session.record(grads, step, loss_scale)
        except Exception:  # gradwatch must never break training
            self._failed.add(key)
            log.exception("gradwatch: cannot record gradients of %s; it is no longer watched",
                          name)
