"""Sees every ``GradientTape.gradient`` call and diagnoses the ``None`` results.

`listen` patches ``tf.GradientTape`` (the class: Keras 3, tf-keras and custom
loops all go through it) while at least one listener is registered. After a
gradient call that returned ``None`` for a variable, once per traced function
and variable (or again, for a later call's loss, where the first said only that it is
not on its loss path):

- inside ``tf.function`` (``model.fit``, compiled loops) the traced graph is
  analysed at once, at trace time;
- eagerly, the forward computation is gone, so the *next* step is recorded
  (`EagerRecorder`) and analysed at its gradient call. Diagnose-only mode
  (``gradwatch doctor``) records from the start, so the first step is explained.

Listeners get ``(variable, Diagnosis)`` on the thread that called ``gradient``.
Nothing here may break training: failures are logged and swallowed.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

import tensorflow as tf
from tensorflow.python.eager import backprop
from tensorflow.python.framework import ops

from gradwatch.agent.core.diagnosis import Cause, Diagnosis
from gradwatch.agent.tensorflow import forward_graph
from gradwatch.agent.tensorflow.diagnosis import Diagnoser
from gradwatch.agent.tensorflow.forward_graph import RECORDED_ALL, EagerRecorder, Recording
from gradwatch.agent.tensorflow.variables import tf_variables, variable_handles

log = logging.getLogger(__name__)

Listener = Callable[[Any, Diagnosis], None]


def _ref(obj: Any) -> Callable[[], Any]:
    try:
        return weakref.ref(obj)
    except TypeError:  # None, or an object without weak references: keep it
        return lambda: obj


#: Verdicts another gradient call of the same traced function may improve on (per-loss
#: gradients: each call's None for the other head is "not on its loss path").
_VAGUE = frozenset({Cause.NOT_ON_LOSS_PATH, Cause.UNUSED, Cause.UNKNOWN})


class _Seen:
    """(graph, variable) pairs already diagnosed, with their verdict (None: not
    diagnosed); graph None means eager. Held weakly, so a new graph or variable that
    reuses a dead one's id() is not taken for it."""

    def __init__(self) -> None:
        self._pairs: dict[tuple[int, int], tuple[Callable[[], Any], Callable[[], Any],
                                                 Diagnosis | None]] = {}

    def __contains__(self, pair: tuple[Any, Any]) -> bool:
        graph, variable = pair
        refs = self._pairs.get((id(graph), id(variable)))
        return refs is not None and refs[0]() is graph and refs[1]() is variable

    def verdict(self, graph: Any, variable: Any) -> Diagnosis | None:
        return self._pairs[(id(graph), id(variable))][2] if (graph, variable) in self else None

    def due(self, graph: Any, variable: Any) -> bool:
        """Not diagnosed yet, or (in a traced function) only vaguely."""
        if (graph, variable) not in self:
            return True
        verdict = self.verdict(graph, variable)
        return graph is not None and verdict is not None and verdict.cause in _VAGUE

    def add(self, graph: Any, variable: Any, verdict: Diagnosis | None = None) -> None:
        if len(self._pairs) > 10_000:  # forget the dead
            self._pairs = {k: r for k, r in self._pairs.items()
                           if r[1]() is not None and (k[0] == id(None) or r[0]() is not None)}
        self._pairs[(id(graph), id(variable))] = (_ref(graph), _ref(variable), verdict)

    def clear(self) -> None:
        self._pairs.clear()


class _GradientCalls:
    """Process-wide: the patch, the listeners, and what was already diagnosed."""

    def __init__(self) -> None:
        self.listeners: list[Listener] = []
        self.record_eagerly_always = 0
        self.telling = 0  # listeners that leave logging the verdicts to this module
        self.calls = 0  # gradient calls seen while listening
        self._lock = threading.RLock()
        self._originals: dict[str, Any] = {}
        self._seen = _Seen()
        self._logged: set[Diagnosis] = set()
        #: Per variable id: a reference to it, and whether the latest gradient call that
        #: asked for it returned None (see `got_no_gradient`).
        self._latest: dict[int, tuple[Callable[[], Any], bool]] = {}
        self._latest_limit = 10_000
        #: Zeros this module filled in where a call asked for ``unconnected_gradients=
        #: ZERO`` (by id, held weakly): to a monitor, gradients that do not exist.
        self._filled: dict[int, weakref.ref] = {}
        #: The latest gradient calls' sources, each with whether it got None (newest last).
        self._recent: collections.deque[list[tuple[Callable[[], Any], bool]]] = \
            collections.deque(maxlen=8)
        self._recorder = EagerRecorder()
        self._awaiting: set[int] = set()  # variable ids whose eager step is being recorded
        #: The persistent tape whose gradient calls the current eager recording serves
        #: (kept through its calls: they read the same forward ops), if any.
        self._kept_for: Callable[[], Any] | None = None

    def listen(self, listener: Listener, *, record_eagerly: bool = False,
               tells: bool = True) -> Callable[[], None]:
        with self._lock:
            self.listeners.append(listener)
            self.record_eagerly_always += record_eagerly
            self.telling += tells
            if not self._originals:
                self._patch()
            if record_eagerly:
                self._recorder.start()

        def stop() -> None:
            with self._lock:
                if listener in self.listeners:
                    self.listeners.remove(listener)
                    self.record_eagerly_always -= record_eagerly
                    self.telling -= tells
                if not self.record_eagerly_always and not self._awaiting:
                    self._recorder.stop()
                if not self.listeners:
                    self._recorder.stop()
                    self._awaiting.clear()
                    self._seen.clear()
                    self._latest.clear()
                    self._unpatch()

        return stop

    # -- the patch ------------------------------------------------------------------------

    def _patch(self) -> None:
        tape_class = backprop.GradientTape
        self._originals = {name: getattr(tape_class, name)
                           for name in ("__enter__", "__exit__", "stop_recording", "gradient")}
        calls, originals = self, self._originals

        def entered(tape):
            result = originals["__enter__"](tape)
            calls._entered(tape)
            calls._mark(tape, "start")
            return result

        def exited(tape, *exc_info):
            calls._mark(tape, "stop")
            return originals["__exit__"](tape, *exc_info)

        @contextlib.contextmanager
        def stop_recording(tape):
            with originals["stop_recording"](tape):
                calls._mark(tape, "stop")
                try:
                    yield
                finally:
                    calls._mark(tape, "start")

        def patched_gradient(tape, target, sources, output_gradients=None,
                             unconnected_gradients=tf.UnconnectedGradients.NONE):
            before = calls._position_or_none()
            # Zeros for unconnected sources hide missing gradients: asked for None, and
            # filled in here (as TensorFlow fills them), they are diagnosed and known.
            fill = _asks_zeros(unconnected_gradients) and _fillable(sources)
            result = originals["gradient"](
                tape, target, sources, output_gradients,
                tf.UnconnectedGradients.NONE if fill else unconnected_gradients)
            try:
                calls._after_gradient(tape, target, sources, result, before)
            except Exception:  # never break training
                log.exception("gradwatch: diagnosing missing gradients failed")
            return calls._fill_zeros(sources, result) if fill else result

        # Called from users' functions, which AutoGraph converts (and with them what they
        # call, unless told not to): gradwatch's code runs as written.
        unconverted = tf.autograph.experimental.do_not_convert
        tape_class.__enter__ = unconverted(entered)
        tape_class.__exit__ = unconverted(exited)
        tape_class.stop_recording = unconverted(stop_recording)
        tape_class.gradient = unconverted(patched_gradient)

    def _unpatch(self) -> None:
        for name, original in self._originals.items():
            setattr(backprop.GradientTape, name, original)
        self._originals = {}

    def _position(self) -> tuple[Any, int]:
        if tf.inside_function():
            graph = ops.get_default_graph()
            return graph, forward_graph.graph_position(graph)
        return None, self._recorder.position

    def _position_or_none(self) -> tuple[Any, int] | None:
        try:
            return self._position()
        except Exception:
            return None

    def _mark(self, tape: Any, kind: str) -> None:
        """Notes where ``tape`` started or stopped recording: in which graph (an eager
        recording's generation outside functions) and at which position."""
        try:
            graph, position = self._position()
            scope = graph if graph is not None else self._recorder.generation
            marks = tape.__dict__.setdefault("_gradwatch_marks", [])
            marks.append((kind, scope, position))
            del marks[:-64]  # a tape paused in a loop keeps the last ones
        except Exception:
            pass

    def _recording(self, tape: Any, graph: Any) -> Recording:
        """When ``tape`` recorded, in ``graph`` (None: the current eager recording, where
        marks of an earlier recording count as made at its start)."""
        marks = getattr(tape, "_gradwatch_marks", ())
        if graph is None:
            generation = self._recorder.generation
            mine = [(kind, position if scope == generation else 0)
                    for kind, scope, position in marks if isinstance(scope, int)]
        else:
            mine = [(kind, position) for kind, scope, position in marks if scope is graph]
        return Recording.from_marks(mine) if mine else RECORDED_ALL

    @staticmethod
    def _watched(tape: Any) -> set[int] | None:
        """The handles a tape made with ``watch_accessed_variables=False`` watches."""
        if getattr(tape, "_watch_accessed_variables", True):
            return None
        return {h for v in tape.watched_variables() for h in variable_handles(v)}

    # -- after each gradient call ---------------------------------------------------------

    def _after_gradient(self, tape: Any, target: Any, sources: Any, result: Any,
                        before: tuple[Any, int] | None) -> None:
        self.calls += 1
        flat_sources = tf.nest.flatten(sources, expand_composites=False)
        flat_grads = tf.nest.flatten(result, expand_composites=False)
        if len(flat_sources) != len(flat_grads):
            return
        self._note_results(flat_sources, flat_grads)
        if before is None:
            return
        graph, position = before
        missing = [v for v, g in zip(flat_sources, flat_grads, strict=True)
                   if g is None and self._seen.due(graph, v) and variable_handles(v)]
        with self._lock:
            if graph is None:
                self._after_eager_gradient(tape, target, missing)
                return
            if not missing:
                return
            forward = forward_graph.from_func_graph(graph, position,
                                                    self._recording(tape, graph))
            self._diagnose(forward, tape, target, missing, graph)

    def _note_results(self, sources: list[Any], grads: list[Any]) -> None:
        with self._lock:
            if len(self._latest) > self._latest_limit:  # forget the dead
                self._latest = {k: v for k, v in self._latest.items() if v[0]() is not None}
                self._latest_limit = max(10_000, 2 * len(self._latest))
            call = [(_ref(variable), grad is None)
                    for variable, grad in zip(sources, grads, strict=True)]
            self._latest.update((id(ref()), (ref, none)) for ref, none in call)
            self._recent.append(call)

    def got_no_gradient(self, variable: Any) -> bool:
        latest = self._latest.get(id(variable))
        return latest is not None and latest[1] and latest[0]() is variable

    def _fill_zeros(self, sources: Any, result: Any) -> Any:
        """``result`` with zeros of each source's shape and type for its None gradients."""
        flat = tf.nest.flatten(result)
        for i, (source, grad) in enumerate(zip(tf.nest.flatten(sources), flat, strict=True)):
            if grad is None:
                flat[i] = zeros = tf.zeros(source.shape, source.dtype)
                with self._lock:
                    if len(self._filled) > 10_000:
                        self._filled = {k: r for k, r in self._filled.items() if r() is not None}
                    self._filled[id(zeros)] = weakref.ref(zeros)
        return tf.nest.pack_sequence_as(result, flat)

    def filled(self, grad: Any) -> bool:
        ref = self._filled.get(id(grad))
        return ref is not None and ref() is grad

    def filtered_from(self, variables: list[Any]) -> list[Any] | None:
        """The sources of the latest gradient call that asked for all of ``variables``, if
        ``variables`` are exactly those it got a gradient for and some got None (an update
        filtered ``if g is not None``); else None."""
        given = {id(v) for v in variables}
        with self._lock:
            recent = list(self._recent)
        for call in reversed(recent):
            sources = [(ref(), none) for ref, none in call]
            if not given <= {id(v) for v, _ in sources}:
                continue
            if all(none for _, none in sources) or any(
                    v is None or (id(v) in given) == none for v, none in sources):
                return None
            return [v for v, _ in sources]
        return None

    def _entered(self, tape: Any) -> None:
        """A tape starts recording: a recording kept for a persistent tape whose own
        recording is over (the previous step's) ends, so that it spans one step."""
        kept = self._kept_for() if self._kept_for is not None else None
        if self._kept_for is None or kept is tape or getattr(kept, "_recording", False):
            return
        with self._lock:
            self._kept_for = None
            self._recorder.stop()
            if self.record_eagerly_always or self._awaiting:
                self._recorder.start()

    def _after_eager_gradient(self, tape: Any, target: Any, missing: list[Any]) -> None:
        """Diagnoses from the recording of this step if there is one, else records the
        next. Each gradient call ends the recording and starts a fresh one if needed,
        except a persistent tape's: its next call reads the same forward ops (a GAN's or
        CycleGAN's losses, one tape), so the recording goes on (see `_entered`)."""
        recorder = self._recorder
        persistent = bool(getattr(tape, "_persistent", False))
        if missing and recorder.active and recorder.overflowed:
            log.warning("gradwatch: an eager step has more than %d ops or keeps more than "
                        "%d MiB of tensors; its missing gradients are not diagnosed",
                        recorder.max_ops, recorder.max_bytes >> 20)
            for variable in missing:
                self._seen.add(None, variable)
        elif missing and recorder.active:
            if persistent:
                with recorder.paused() as forward:
                    self._diagnose_recorded(forward, tape, target, missing)
            else:
                self._diagnose_recorded(recorder.stop(), tape, target, missing)
        elif missing:
            self._awaiting.update(id(v) for v in missing)
        self._awaiting.difference_update(id(v) for v in missing if (None, v) in self._seen)
        if persistent and recorder.active and (self.record_eagerly_always or self._awaiting):
            self._kept_for = _ref(tape)
            return
        self._kept_for = None
        recorder.stop()
        if self.record_eagerly_always or self._awaiting:
            recorder.start()

    def _diagnose_recorded(self, forward: forward_graph.ForwardGraph, tape: Any, target: Any,
                           missing: list[Any]) -> None:
        """Diagnoses ``missing`` with an eager recording."""
        watched = {id(v.handle) for w in tape.watched_variables() for v in tf_variables(w)}
        forward.link_unseen_reads(v for m in missing for v in tf_variables(m)
                                  if id(v.handle) in watched)
        forward.mark_outside(self._recording(tape, None))
        self._diagnose(forward, tape, target, missing, None)

    def _diagnose(self, forward: forward_graph.ForwardGraph, tape: Any, target: Any,
                  missing: list[Any], graph: Any) -> None:
        diagnoser = Diagnoser(forward, [id(t) for t in tf.nest.flatten(target) if t is not None],
                              self._watched(tape))
        for variable in missing:
            if (graph, variable) not in self._seen:
                self._seen.add(graph, variable)
        for variable, verdict in zip(missing, diagnoser.diagnose_all(missing), strict=True):
            if self._seen.verdict(graph, variable) is not None and verdict.cause in _VAGUE:
                continue  # another loss of this function: its verdict stands
            self._seen.add(graph, variable, verdict)
            if self.telling and verdict not in self._logged:
                self._logged.add(verdict)
                log.warning("gradwatch: %s", verdict.message())
            for listener in list(self.listeners):
                try:
                    listener(variable, verdict)
                except Exception:
                    log.exception("gradwatch: a diagnosis listener failed")


_CALLS = _GradientCalls()


def listen(listener: Listener, *, record_eagerly: bool = False,
           tells: bool = True) -> Callable[[], None]:
    """Calls ``listener(variable, diagnosis)`` for each variable found without a gradient
    (once per traced function and variable; again where a later gradient call of the
    function, for another loss, tells more than "not on the loss path"). ``record_eagerly``:
    record eager steps from now on, so the first eager step is diagnosed too (slow:
    diagnose-only use). ``tells``: this module logs each verdict (else the listener says
    what it needs to: a monitor, for the variables its optimizers get no gradient for).
    Returns a function that stops listening."""
    return _CALLS.listen(listener, record_eagerly=record_eagerly, tells=tells)


def filtered_from(variables: list[Any]) -> list[Any] | None:
    """All the variables of the gradient call whose results ``variables`` are, once its
    None gradients were filtered out (see `_GradientCalls.filtered_from`); else None."""
    return _CALLS.filtered_from(variables)


def _asks_zeros(unconnected_gradients: Any) -> bool:
    try:
        return (tf.UnconnectedGradients(unconnected_gradients)
                is tf.UnconnectedGradients.ZERO)
    except ValueError:  # TensorFlow says so
        return False


def _fillable(sources: Any) -> bool:
    """Whether this module can fill in zeros for ``sources`` as TensorFlow would: plain
    variables and tensors of known shape."""
    return all(isinstance(s, tf.Variable | tf.Tensor) and s.shape.is_fully_defined()
               for s in tf.nest.flatten(sources))


def without_filled_zeros(grads: list[Any]) -> list[Any]:
    """``grads`` with None for the zeros a gradient call filled in for variables it found no
    gradient for (``unconnected_gradients=ZERO``)."""
    return [None if _CALLS.filled(g) else g for g in grads]


def got_no_gradient(variable: Any) -> bool:
    """Whether the latest ``GradientTape.gradient`` call that asked for ``variable`` (while
    anyone listened; in a traced function, when it was traced) returned None for it."""
    return _CALLS.got_no_gradient(variable)


def gradient_calls() -> int:
    """``GradientTape.gradient`` calls seen while anyone listened (a running count)."""
    return _CALLS.calls
