"""`GradientMonitor` for TensorFlow: the agent's public API for Keras 3, tf-keras and
``tf.distribute``.

    monitor = GradientMonitor(collector="127.0.0.1:8470", training_job="my-run")
    optimizer = monitor.wrap(optimizer)   # Keras 3 and tf-keras; model.fit and custom loops
    monitor.observe(grads, variables)     # loops that don't use a wrapped optimizer
    monitor.close()                       # flush; also a context manager

Every setting is an argument or a ``GRADWATCH_*`` variable
(`gradwatch.agent.core.settings.AgentSettings`); the task comes from ``TF_CONFIG``
unless set.
"""

from __future__ import annotations

import logging
import sys
import weakref
from collections.abc import Hashable, Sequence
from typing import Any

import tensorflow as tf

from gradwatch import __version__
from gradwatch.agent.core.diagnosis import Diagnosis
from gradwatch.agent.core.identity import tf_config
from gradwatch.agent.core.monitor import MonitorCore, optimizer_base_name
from gradwatch.agent.tensorflow import tape
from gradwatch.agent.tensorflow.optimizers import Hooks, wrap_optimizer
from gradwatch.agent.tensorflow.recorder import UnsupportedStrategy
from gradwatch.agent.tensorflow.session import Gradients, TensorFlowSession
from gradwatch.agent.tensorflow.variables import gradient_pairs, gradient_variables, variable_name

log = logging.getLogger(__name__)

#: Distinct ``observe`` names one monitor watches. Each is a session (a ring buffer of
#: device memory, a trace, a registration with the collector); a name per step (an
#: f-string with the step number) would add one every step: calls with a name past
#: these are ignored, said once. GANs and multi-model loops use a few.
MAX_OBSERVE_NAMES = 64

#: On a wrapped optimizer: whether a ``LossScaleOptimizer`` around it reports instead
#: (`GradientMonitor._inside_loss_scaling`).
_OUTER = "_gradwatch_inside_loss_scaling"


def _loss_scale(optimizer: Any) -> Any:
    """What the gradients passed to ``optimizer`` are multiplied by, else None: a Keras 3
    ``LossScaleOptimizer``'s current scale (its ``apply`` unscales them), or a Keras 3
    optimizer's ``loss_scale_factor`` (``model.fit`` multiplies the loss by it, ``apply``
    divides the gradients). A tf-keras ``LossScaleOptimizer`` is given gradients already
    unscaled (``get_unscaled_gradients``, or ``minimize`` under ``model.fit``)."""
    if _is_loss_scaled(optimizer):
        scale = getattr(optimizer, "dynamic_scale", None)
        return None if scale is None else tf.convert_to_tensor(scale)
    return getattr(optimizer, "loss_scale_factor", None)


def _is_loss_scaled(optimizer: Any) -> bool:
    return "LossScaleOptimizer" in type(optimizer).__name__


def _calling_loss_scale_optimizer(optimizer: Any) -> tuple[Any, Any]:
    """The ``LossScaleOptimizer`` whose methods (up the stack) call a method of its
    ``inner_optimizer``, ``optimizer``, and the frame of its ``apply`` among them (None
    if not); else (None, None). ``compile`` adds one under a ``mixed_float16`` policy
    around the optimizer it is given."""
    outer, frame = None, sys._getframe(2)
    for _ in range(40):  # tf.cond's frames included (tf-keras calls it inside one)
        if frame is None:
            break
        caller = frame.f_locals.get("self")
        if outer is None and caller is not optimizer and _is_loss_scaled(caller) and \
                getattr(caller, "inner_optimizer", None) is optimizer:
            outer = caller
        if outer is not None and caller is outer and frame.f_code.co_name == "apply":
            return outer, frame
        frame = frame.f_back
    return outer, None


def _accumulation(optimizer: Any, grads: list, variables: list, loss_scale: Any
                  ) -> tuple[tf.Tensor | None, Gradients]:
    """Whether this call applies an update (None: every call does) and the gradients it
    applies, times ``loss_scale`` as ``grads`` are. For a Keras 3 optimizer with
    ``gradient_accumulation_steps`` (N; its own, or its inner optimizer's under a
    ``LossScaleOptimizer``) only every Nth call does, and it applies, per replica, the
    mean of the N micro-batches' (before clipping, as any update's): returned as a
    function, to run only on those calls.

    Reads the optimizer's accumulators (unscaled gradients) and micro-step counter: Keras
    internals (3.15), so any error here means "record each micro-batch as it comes".
    Builds the optimizer first if it is not (as ``apply`` would, a moment later)."""
    accumulating = getattr(optimizer, "inner_optimizer", optimizer)
    steps = getattr(accumulating, "gradient_accumulation_steps", None)
    if not steps:
        return None, grads
    if not optimizer.built:
        import keras

        with keras.name_scope(optimizer.name, caller=optimizer):
            optimizer.build(variables)
        optimizer.built = True
    sums = [accumulating._accumulated_gradients[accumulating._get_variable_index(v)]
            for v in variables]
    due = tf.equal((accumulating._iterations + 1) % steps, 0)

    def mean() -> list:
        scale = 1.0 if loss_scale is None else tf.cast(loss_scale, tf.float32)
        return [None if g is None else (tf.convert_to_tensor(g) + s * scale) / steps
                for g, s in zip(grads, sums, strict=True)]

    return due, mean


def _warn_if_known_broken(optimizer: Any) -> None:
    """Says so when the combination cannot train, whatever gradwatch does, or when
    gradwatch watches it at a cost."""
    strategy = tf.distribute.get_strategy()
    keras3 = type(optimizer).__module__.startswith("keras.")
    backend = sys.modules["keras"].config.backend() if keras3 else "tensorflow"
    if backend != "tensorflow":
        log.warning(
            "gradwatch: Keras runs on the %r backend: %s's gradients are copied to the host "
            "each step and measured with TensorFlow (on an accelerator that fails at the "
            "first step, and the optimizer is no longer watched). For PyTorch training, "
            "gradwatch.agent.torch watches torch optimizers on the device.",
            backend, optimizer_base_name(optimizer))
    if keras3 and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        log.warning(
            "gradwatch: Keras 3 model.fit under MultiWorkerMirroredStrategy fails upstream "
            "('unsupported type PerReplica', keras-team/keras#20585). Custom loops "
            "(strategy.run + optimizer.apply or monitor.observe) and tf-keras model.fit work, "
            "and gradwatch watches them.")
    if (keras3 and getattr(optimizer, "gradient_accumulation_steps", None)
            and strategy.num_replicas_in_sync > 1):
        log.warning(
            "gradwatch: Keras 3's gradient_accumulation_steps fails upstream under %s with "
            "more than one replica ('merge_call called while defining a new graph', "
            "keras-team/keras#20582); gradwatch watches the optimizer all the same.",
            type(strategy).__name__)


def _iterations(optimizer: Any) -> int | None:
    """The optimizer's step count, read eagerly (None inside a trace, or if unreadable).
    Through a tensor: ``int()`` of a Keras 3 variable that wraps a ``MirroredVariable``
    (any tf.distribute strategy) raises."""
    try:
        return int(tf.convert_to_tensor(optimizer.iterations).numpy())
    except Exception:
        return None


def _versions() -> dict[str, str]:
    versions = {"gradwatch": __version__, "tensorflow": tf.__version__}
    try:
        import keras

        versions["keras"] = keras.__version__
    except ImportError:
        pass
    return versions


class GradientMonitor(MonitorCore):
    """Watches gradients of one training process and ships statistics to a collector.

    Thread-safety: `wrap`, `observe` and `close` are called from the training
    thread (``observe`` and wrapped optimizers also from ``tf.function`` traces).
    Network I/O and device→host copies run on one background thread.

    Args:
      collector: ``host:port`` of the collector, a comma-separated list of replicas,
        or ``dns:///name:port`` (see `gradwatch.agent.core.endpoints`).
      training_job: name shared by all tasks of one run.
      task_type, task_index: override ``TF_CONFIG``.
      buffer_steps: on-device ring buffer size per session; steps recorded
        faster than the host drains them are dropped and counted.
      statistics_every: record statistics at every Nth optimizer step only (default
        1: every step); what it costs in alert latency: docs/limits.md.
      max_buffer_bytes: host memory for statistics not yet acknowledged, across
        sessions (while the collector is away); beyond it the oldest steps are dropped
        and counted. Default 128 MiB.
      flush_interval_s: how often statistics leave the device.
      ack_timeout_s: a collector that acknowledges nothing for this long is left for
        another (default 10 s).
      failback_interval_s: how often a preferred collector is checked while on a
        fallback (default 30 s).
      enabled: ``False`` makes every method a no-op.
      diagnose: explain missing gradients (default on): patches ``tf.GradientTape``
        while the monitor is open; see `gradwatch.agent.tensorflow.tape`.
      tls, tls_ca_file, tls_cert_file, tls_key_file, token, token_file: transport
        security (`gradwatch.agent.core.channel`).

    Each has a ``GRADWATCH_*`` variable (`AgentSettings`); arguments win. An invalid
    setting disables the monitor with an error in the log: a misconfigured gradwatch
    never stops training.
    """

    launchers = (tf_config,)

    def __init__(self, collector: str | None = None, training_job: str | None = None, *,
                 task_type: str | None = None, task_index: int | None = None,
                 buffer_steps: int | None = None, statistics_every: int | None = None,
                 max_buffer_bytes: int | None = None,
                 flush_interval_s: float | None = None, ack_timeout_s: float | None = None,
                 failback_interval_s: float | None = None, enabled: bool | None = None,
                 diagnose: bool | None = None, tls: bool | None = None,
                 tls_ca_file: str | None = None, tls_cert_file: str | None = None,
                 tls_key_file: str | None = None, token: str | None = None,
                 token_file: str | None = None) -> None:
        super().__init__(
            collector=collector, training_job=training_job, task_type=task_type,
            task_index=task_index, buffer_steps=buffer_steps,
            statistics_every=statistics_every, max_buffer_bytes=max_buffer_bytes,
            flush_interval_s=flush_interval_s, ack_timeout_s=ack_timeout_s,
            failback_interval_s=failback_interval_s, enabled=enabled, diagnose=diagnose,
            tls=tls, tls_ca_file=tls_ca_file, tls_cert_file=tls_cert_file,
            tls_key_file=tls_key_file, token=token, token_file=token_file)
        self._stop_diagnosing = None
        self._unread_accumulators: set[str] = set()
        #: Wrapped optimizers (by id): a weak reference, and their step count when wrapped.
        self._wrapped: dict[int, tuple[weakref.ref, int | None]] = {}
        #: The variables each wrapped optimizer (by id) was built for, held weakly.
        self._built: dict[int, list[weakref.ref]] = {}
        #: Verdicts not logged yet, by variable id (`_tell`), and those logged (once each).
        self._untold: dict[int, Diagnosis] = {}
        self._told: set[Diagnosis] = set()
        #: ``observe`` names seen (at most MAX_OBSERVE_NAMES), and whether one past them
        #: was refused (said once).
        self._observe_names: set[str] = set()
        self._refused_observe_name = False
        if self.enabled and self.settings.diagnose:
            self._stop_diagnosing = tape.listen(self._on_diagnosis, tells=False)

    # -- public API ---------------------------------------------------------------------

    def wrap(self, optimizer: Any) -> Any:
        """Patches a Keras 3 or tf-keras optimizer in place so each update is observed
        (``None`` gradients included) before it is applied; returns the optimizer."""
        if not self.enabled:
            return optimizer
        _warn_if_known_broken(optimizer)
        known = self._wrapped.get(id(optimizer))
        if known is None or known[0]() is not optimizer:  # (a dead one's id: not its build)
            self._built.pop(id(optimizer), None)
        self._wrapped[id(optimizer)] = (weakref.ref(optimizer), _iterations(optimizer))
        return wrap_optimizer(optimizer, Hooks(self._on_optimizer_gradients, self._on_rejected,
                                               self._on_optimizer_built))

    @tf.autograph.experimental.do_not_convert  # runs as written in a converted function
    def observe(self, grads: Sequence[Any], variables: Sequence[Any], *,
                step: Any = None, name: str = "observe") -> None:
        """Records one step's gradients for ``variables`` (same order, ``None`` allowed).

        Call it where the gradients are (eagerly, inside ``tf.function``, or in
        replica context); ``step`` defaults to a count of the calls for this ``name``
        and variable list, from 0 as an optimizer's. ``name`` names a series of steps
        (a model), not a step: past `MAX_OBSERVE_NAMES` distinct names, calls with a
        new one record nothing (said once).
        """
        if self.enabled and self._known_observe_name(name):
            if self._untold:
                self._tell(grads, variables)
            grads, variables = gradient_pairs(list(grads), list(variables))
            self._record(("observe", name), name, grads, variables, step)

    # -- internals ----------------------------------------------------------------------

    def _known_observe_name(self, name: str) -> bool:
        """Whether `observe` records under ``name``: one of the first MAX_OBSERVE_NAMES
        distinct names; past them, a warning the first time, and False."""
        if name in self._observe_names:
            return True
        if len(self._observe_names) < MAX_OBSERVE_NAMES:
            self._observe_names.add(name)
            return True
        if not self._refused_observe_name:
            self._refused_observe_name = True
            log.warning("gradwatch: observe() was given %d distinct names; %r and any other "
                        "new name are ignored (not recorded). A name stands for one model or "
                        "series of steps and should be the same at every step: a name that "
                        "changes each step (name=f\"step{i}\") would make a session, a trace "
                        "and device memory per step. Pass the step number as step=.",
                        MAX_OBSERVE_NAMES, name)
        return False

    def _on_close(self) -> None:
        if self._stop_diagnosing is not None:
            self._stop_diagnosing()
        self._warn_of_unseen_steps()

    def _warn_of_unseen_steps(self) -> None:
        """A wrapped optimizer that took steps none of which reached this monitor ran in a
        function traced before it was wrapped (model.fit's after a first fit, or after a
        notebook cell made a new monitor; such a function keeps what it traced): says so
        at close, when it is known. So is a wrapped optimizer that took no step while
        another trained (its update traced out: a Keras 3 GAN's frozen discriminator)."""
        owners = {key[0] for key in self._sessions} | {key[0] for key in self._failed}
        idle, trained = [], []
        for owner, (ref, wrapped_at) in self._wrapped.items():
            optimizer = ref()
            if optimizer is None or wrapped_at is None or \
                    getattr(optimizer, _OUTER, False):  # its LossScaleOptimizer reports
                continue
            now = _iterations(optimizer)
            if now is None:
                continue
            if now <= wrapped_at:
                if owner not in owners:
                    idle.append(optimizer_base_name(optimizer))
                continue
            trained.append(optimizer_base_name(optimizer))
            if owner not in owners:
                log.warning("gradwatch: %s took %d steps after wrap() and none reached "
                            "gradwatch: they ran in a training function traced before "
                            "wrap() (model.fit's, until model.compile() runs again; or a "
                            "tf.function of yours). Wrap before compiling, or compile again "
                            "after wrapping.", optimizer_base_name(optimizer), now - wrapped_at)
        if idle and trained:
            log.warning("gradwatch: %s took no step while %s trained: its model's updates "
                        "never ran (Keras 3 leaves out the update of a model whose trainable "
                        "was False when its training function was traced: a GAN's "
                        "discriminator frozen before compiling the combined model, and never "
                        "set trainable again around its own train_on_batch)",
                        ", ".join(idle), ", ".join(trained))

    def _inside_loss_scaling(self, optimizer: Any) -> bool:
        """Whether ``optimizer`` is called by a ``LossScaleOptimizer`` that reports in its
        place (training thread; looked for once per optimizer, at its first build or
        update). An inner optimizer sees only the steps without overflow. Found while
        the outer one builds it at the start of its ``apply`` (Keras 3), the outer one
        reports from then on, this call's step included, skipped steps counted; found
        elsewhere (tf-keras calls it inside a ``tf.cond``), that is said once."""
        inside = getattr(optimizer, _OUTER, None)
        if inside is not None:
            return inside
        outer, frame = _calling_loss_scale_optimizer(optimizer)
        inside = outer is not None and id(outer) in self._wrapped
        if outer is not None and not inside:
            name = optimizer_base_name(optimizer)
            arguments = {} if frame is None else frame.f_locals
            if "grads" in arguments:
                log.info("gradwatch: %s is inside a LossScaleOptimizer (compile() adds one "
                         "under a mixed_float16 policy); watching that one instead, which "
                         "also reports the steps it skips for overflow", name)
                self.wrap(outer)
                variables = arguments.get("trainable_variables")
                self._on_optimizer_gradients(outer, list(arguments["grads"]), list(
                    outer._trainable_variables if variables is None else variables))
                inside = True
            else:
                log.warning("gradwatch: %s is inside a LossScaleOptimizer (compile() adds "
                            "one under a mixed_float16 policy), which calls it only for "
                            "steps without overflow: the steps it skips are not reported. "
                            "Wrap model.optimizer after compile() to count them.", name)
        object.__setattr__(optimizer, _OUTER, inside)
        return inside

    def _on_optimizer_gradients(self, optimizer: Any, grads: list, variables: list) -> None:
        if self._inside_loss_scaling(optimizer):
            return
        grads, variables = self._filtered_back(optimizer, *gradient_pairs(grads, variables))
        if self._untold:
            self._tell(grads, variables)
        step = getattr(optimizer, "iterations", None)
        name = optimizer_base_name(optimizer)
        loss_scale = _loss_scale(optimizer)
        try:
            due, applied = _accumulation(optimizer, grads, variables, loss_scale)
        except Exception as error:  # another Keras's internals
            due, applied = None, grads
            if name not in self._unread_accumulators:
                self._unread_accumulators.add(name)
                log.warning("gradwatch: cannot read %s's gradient accumulators (%s); each "
                            "micro-batch is reported as a step instead", name, error)
        self._record(id(optimizer), name, applied, variables,
                     None if step is None else tf.convert_to_tensor(step),
                     loss_scale=loss_scale, loss_scaled=_is_loss_scaled(optimizer), due=due)

    def _built_variables(self, optimizer: Any) -> list | None:
        """The variables ``optimizer`` was built for (None: not known, or some are gone)."""
        refs = self._built.get(id(optimizer))
        if refs is None:
            built = getattr(optimizer, "_trainable_variables", None)  # Keras 3, built earlier
            return gradient_variables(list(built)) if built else None
        built = [ref() for ref in refs]
        return None if any(v is None for v in built) else built

    def _filtered_back(self, optimizer: Any, grads: list, variables: list
                       ) -> tuple[list, list]:
        """An update that leaves out variables its optimizer was built for whose latest
        gradient call returned None (``if g is not None`` over the pairs: the usual way to
        quiet Keras's "Gradients do not exist" warning) is the update with them put back
        as None, in the order the optimizer was built with: they are reported missing,
        and every such update goes to the optimizer's one session, whichever it drops. An
        optimizer built for the filtered update itself (Keras builds at the first update)
        gets the variables of the gradient call the update is the filtered result of. A
        variable simply not in this update (a part trained by its own loss) stays out."""
        given = {id(v): g for g, v in zip(grads, variables, strict=False)}
        if len(given) != len(variables):
            return grads, variables  # a variable twice
        built = self._built_variables(optimizer)
        if built and len(variables) < len(built):
            if not given.keys() <= {id(v) for v in built}:
                return grads, variables  # one it was not built for
            kept = [v for v in built if id(v) in given or tape.got_no_gradient(v)]
        else:  # built from this update (Keras builds at the first): the gradient call tells
            asked = tape.filtered_from(variables)
            kept = gradient_variables(asked) if asked else variables
        if len(kept) == len(variables):
            return grads, variables  # nothing filtered out
        return [given.get(id(v)) for v in kept], kept

    def _on_optimizer_built(self, optimizer: Any, variables: list) -> None:
        variables = gradient_variables(variables)
        self._built[id(optimizer)] = [weakref.ref(v) for v in variables]
        if self._inside_loss_scaling(optimizer):
            return
        if tf.distribute.in_cross_replica_context() and not self._closed:
            self._session(id(optimizer), optimizer_base_name(optimizer), variables,
                          loss_scaled=_is_loss_scaled(optimizer))

    def _on_rejected(self, optimizer: Any, grads: list, variables: list, error: Exception) -> None:
        """The optimizer raised (Keras: "No gradients provided for any variable").
        Inside a trace our in-graph record never runs, so report from the host. Not for
        other refusals, with every gradient there ("Unknown variable": an optimizer built
        for other variables): no step ran, and none was missing a gradient."""
        grads, variables = gradient_pairs(grads, variables)
        if not tf.inside_function() or all(g is not None for g in grads):
            return
        session = self._sessions.get(self._session_key(id(optimizer), variables))
        if session is not None:
            with tf.init_scope():
                iterations = getattr(optimizer, "iterations", None)
                step = 0 if iterations is None else int(tf.convert_to_tensor(iterations))
            session.record_presence(step, [g is not None for g in grads])
            log.error("gradwatch: %s rejected the update: %s", session.optimizer, error)

    def _on_diagnosis(self, variable: Any, diagnosis: Diagnosis) -> None:
        self.add_diagnosis(variable, variable_name(variable), diagnosis)
        self._untold[id(variable)] = diagnosis

    def _tell(self, grads: Sequence[Any], variables: Sequence[Any]) -> None:
        """Logs the verdicts of the variables an update gets no gradient for, once each
        (a gradient call's None for a variable another call's gradient covers, as with
        per-loss gradients summed before the update, is not the update's)."""
        for grad, variable in zip(grads, variables, strict=False):
            if grad is None:
                verdict = self._untold.pop(id(variable), None)
                if verdict is not None and verdict not in self._told:
                    self._told.add(verdict)
                    log.warning("gradwatch: %s", verdict.message())

    @staticmethod
    def _session_key(owner: Hashable, variables: Sequence[Any]) -> tuple:
        """A session per owner (an optimizer's id, or an `observe` name) and variable list."""
        return (owner, *(id(v) for v in variables))

    def _session(self, owner: Hashable, base: str, variables: list,
                 loss_scaled: bool = False) -> TensorFlowSession | None:
        """The session for these variables, created on first use (None if that failed).
        In replica context creation goes through ``merge_call``, so all replicas share
        one session; that merge function must never raise, or the other replicas hang."""
        key = self._session_key(owner, variables)
        session = self._sessions.get(key)
        if session is not None:
            return session
        if tf.distribute.in_cross_replica_context():
            return self._new_session(tf.distribute.get_strategy(), key, base, variables,
                                     loss_scaled)
        # A closure, not merge_call args: those are regrouped into PerReplica values.
        return tf.distribute.get_replica_context().merge_call(
            lambda strategy: self._new_session(strategy, key, base, variables, loss_scaled))

    def _new_session(self, strategy: tf.distribute.Strategy, key: tuple, base: str,
                     variables: list, loss_scaled: bool = False) -> TensorFlowSession | None:
        """Creates the session for ``key``, named ``base`` unless another session of
        this process has that name (another optimizer, or the same one updating another
        set of variables): then ``base_2`` ..."""
        name = self.unique_name(key, base)
        with self.session_lock:
            session = self._sessions.get(key)
            if session is None and key not in self._failed:
                if any(other[0] == key[0] for other in self._sessions):
                    log.info("gradwatch: %s updates another set of %d variables; they are "
                             "reported as optimizer %s", base, len(variables), name)
                try:
                    session = TensorFlowSession(
                        self.identity, name, variables, self.settings.buffer_steps,
                        strategy=strategy, versions=_versions(), loss_scaled=loss_scaled,
                        every=self.settings.statistics_every)
                except UnsupportedStrategy as error:
                    self._failed.add(key)
                    log.error("gradwatch: cannot watch %s: %s; it trains unwatched", name,
                              error)
                    return None
                except Exception:  # gradwatch must never break training
                    self._failed.add(key)
                    log.exception("gradwatch: cannot watch %s", name)
                    return None
                self.adopt(key, session)
        return session

    def _record(self, owner: Hashable, name: str, grads: Gradients, variables: list,
                step: Any, *, loss_scale: Any = None, loss_scaled: bool = False,
                due: Any = None) -> None:
        if not callable(grads):
            if len(grads) != len(variables):
                raise ValueError(f"gradwatch: {len(grads)} gradients for {len(variables)} "
                                 "variables")
            grads = tape.without_filled_zeros(grads)
        key = self._session_key(owner, variables)
        if key in self._failed or self._closed:
            return
        try:
            session = self._session(owner, name, variables, loss_scaled)
            if session is not None:
                session.record(grads, step, loss_scale, due)
        except Exception:  # gradwatch must never break training
            self._failed.add(key)
            log.exception("gradwatch: cannot record gradients of %s; it is no longer watched",
                          name)
            self.release(key, None)  # (the collector is told: no task silent there)
