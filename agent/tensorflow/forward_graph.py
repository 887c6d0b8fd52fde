"""The forward computation of one ``tape.gradient`` call as a graph of ops.

It is what `gradwatch.agent.diagnosis` walks to explain a ``None`` gradient.
Two builders produce the same `ForwardGraph`:

- `from_func_graph`: the ``tf.function`` graph in which the gradient was taken
  (``model.fit``, custom loops under ``tf.function``), with nested function
  calls, ``tf.cond`` branches and ``tf.while_loop`` bodies inlined through
  *link* nodes, so a call is followed, never treated as a break;
- `EagerRecorder`: eager ops recorded through an op callback, plus the tensors
  that left TensorFlow (``.numpy()``, ``float()``, NumPy functions called as ``np.*``).

Tensors are identified by ``id()``; the graph (or the recorder) keeps them
alive, so ids are never reused while it exists. Built at trace time or during
one recorded eager step, never on the training hot path.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.python.eager import record
from tensorflow.python.framework import op_callbacks, ops

from gradwatch.agent.core.diagnosis import Source, caller_source, user_source


@dataclass
class Node:
    """An op of the forward pass, or a *link* (function boundary, passes everything)."""

    name: str
    type: str
    inputs: list[int]
    outputs: list[int]
    input_dtypes: list[tf.DType]
    output_dtypes: list[tf.DType]
    order: int
    outside: str = ""  # why the gradient tape did not record it (see `Recording`)
    custom_gradient: str = ""  # gradient override (``tf.custom_gradient``)
    link: bool = False
    _source: Source | None = None
    _op: Any = None  # graph op, for its traceback (read lazily: it is slow)

    @property
    def source(self) -> Source | None:
        if self._source is None and self._op is not None:
            self._source = user_source(self._op.traceback)
        return self._source


@dataclass(frozen=True)
class Recording:
    """When a gradient tape recorded, as positions in one graph or eager recording: an op
    at position ``p`` was recorded when ``start < p <= stop`` for one of ``intervals``.
    An empty tuple: the tape recorded nothing of it."""

    intervals: tuple[tuple[int, float], ...]

    BEFORE = "ran before the GradientTape started recording"
    AFTER = "ran after the GradientTape stopped recording (outside its `with` block)"
    BETWEEN = ("ran while the GradientTape was not recording (between two of its `with` "
               "blocks, or inside tape.stop_recording())")

    @classmethod
    def from_marks(cls, marks: Iterable[tuple[str, int]]) -> Recording:
        """From ``("start" | "stop", position)`` marks in the order they were made."""
        intervals, opened = [], None
        for kind, position in marks:
            if kind == "start" and opened is None:
                opened = position
            elif kind == "stop" and opened is not None:
                intervals.append((opened, position))
                opened = None
        if opened is not None:
            intervals.append((opened, float("inf")))
        return cls(tuple(intervals))

    def outside(self, position: int) -> str:
        """Why an op at ``position`` was not recorded ("" when it was)."""
        if any(start < position <= stop for start, stop in self.intervals):
            return ""
        if self.intervals and position <= self.intervals[0][0]:
            return self.BEFORE
        if not self.intervals or position > self.intervals[-1][1]:
            return self.AFTER
        return self.BETWEEN


#: A tape whose start and stop gradwatch did not see: everything counts as recorded.
RECORDED_ALL = Recording(((-1, float("inf")),))


@dataclass(frozen=True)
class Conversion:
    """A tensor that left TensorFlow (``.numpy()`` and friends) during an eager step."""

    tensor: int
    how: str
    order: int
    source: Source | None


@dataclass
class ForwardGraph:
    nodes: list[Node] = field(default_factory=list)
    producer: dict[int, Node] = field(default_factory=dict)
    consumers: dict[int, list[Node]] = field(default_factory=dict)
    #: id of a variable's (eager) resource handle -> its tensor in this graph.
    handles: dict[int, int] = field(default_factory=dict)
    #: Eager only: tensors converted to host values, and when each tensor was first seen.
    conversions: list[Conversion] = field(default_factory=list)
    first_seen: dict[int, int] = field(default_factory=dict)
    keep_alive: list[Any] = field(default_factory=list)

    def add(self, node: Node) -> Node:
        self.nodes.append(node)
        for key in node.outputs:
            self.producer[key] = node
        for key in node.inputs:
            self.consumers.setdefault(key, []).append(node)
            self.first_seen.setdefault(key, node.order)
        return node

    def link_unseen_reads(self, variables: Iterable[Any]) -> None:
        """Eager only: adds the reads of ``variables`` (tf.Variables) that no op callback saw.

        TensorFlow's C++ fast path reads a tf.Variable passed straight to an op (``x * v``,
        ``tf.nn.bias_add(x, v)``, as tf-keras layers and ``tf.Module`` models do) with no
        ``ReadVariableOp`` a callback sees: the op gets a tensor no recorded op made. Such
        a read shares the variable's buffer, so each such input whose buffer is a
        variable's becomes the output of a ``ReadVariableOp`` of it, placed at the op that
        consumed it. Give only variables the tape watched: a tensor the user read from an
        unchanged variable before the step shares its buffer too, but was not read there.
        """
        unproduced = {id(t): t for t in self.keep_alive
                      if id(t) not in self.producer and id(t) in self.consumers}
        addresses: dict[int, int | None] = {}
        for variable in variables:
            try:
                dtype = tf.as_dtype(variable.dtype).base_dtype
                value = tf.raw_ops.ReadVariableOp(resource=variable.handle, dtype=dtype)
            except Exception:  # not a resource variable after all
                continue
            address = _buffer_address(value)
            if address is None:
                continue
            for key, tensor in unproduced.items():
                if tensor.dtype != dtype or tensor.shape != value.shape or key in self.producer:
                    continue
                if key not in addresses:
                    addresses[key] = _buffer_address(tensor)
                if addresses[key] != address:
                    continue
                consumer = min(self.consumers[key], key=lambda node: node.order)
                self.add(Node("ReadVariableOp", "ReadVariableOp", [id(variable.handle)], [key],
                              [tf.resource], [dtype], consumer.order, _source=consumer.source))
                self.keep_alive.append(variable.handle)

    def mark_outside(self, recording: Recording) -> None:
        """Marks the nodes the tape did not record (eager: positions are node orders)."""
        for node in self.nodes:
            node.outside = recording.outside(node.order)

    def ancestors(self, keys: Iterable[int]) -> set[int]:
        """Tensors that ``keys`` depend on (``keys`` included)."""
        return self.gradient_reachable(keys, lambda node, index: None)

    def gradient_reachable(self, targets: Iterable[int],
                           stops: Callable[[Node, int], str | None]) -> set[int]:
        """Tensors from which a gradient of ``targets`` flows back (``targets`` included):
        backward reachability through the inputs that ``stops`` lets pass."""
        seen = set(targets)
        queue = deque(seen)
        while queue:
            node = self.producer.get(queue.popleft())
            if node is None:
                continue
            for index, key in enumerate(node.inputs):
                if key not in seen and stops(node, index) is None:
                    seen.add(key)
                    queue.append(key)
        return seen

    def flow(self, start: Iterable[int], within: set[int],
             stops: Callable[[Node, int], str | None]) -> tuple[set[int], list[tuple[Node, str]]]:
        """Forward reachability from ``start`` through tensors in ``within``.

        ``stops(node, input_index)`` returns why ``node`` does not pass that input on
        (or None). Returns the reached tensors and the stopping nodes, in the order
        they were met (closest to ``start`` first)."""
        reached = {k for k in start}
        queue = deque(reached)
        stopped: list[tuple[Node, str]] = []
        stopped_ids: set[int] = set()
        while queue:
            key = queue.popleft()
            for node in self.consumers.get(key, ()):
                outputs = [k for k in node.outputs if k in within]
                if not outputs:
                    continue
                why = stops(node, node.inputs.index(key))
                if why is not None:
                    if id(node) not in stopped_ids:
                        stopped_ids.add(id(node))
                        stopped.append((node, why))
                    continue
                for out in outputs:
                    if out not in reached:
                        reached.add(out)
                        queue.append(out)
        return reached, stopped


def _nbytes(tensor: Any) -> int:
    try:
        return tensor.shape.num_elements() * tensor.dtype.size
    except Exception:  # unknown shape, or a dtype without a size (strings, resources)
        return 0


def _buffer_address(tensor: Any) -> int | None:
    """Where an eager tensor's data lives, on any device (through DLPack: a
    ``DLManagedTensor`` starts with the data pointer); None if that cannot be told."""
    try:
        capsule = tf.experimental.dlpack.to_dlpack(tensor)
        managed = _CAPSULE_POINTER(capsule, b"dltensor")
        return ctypes.c_void_p.from_address(managed).value if managed else None
    except Exception:  # a dtype DLPack has no code for, or another TensorFlow
        return None


_CAPSULE_POINTER = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi))


# -- from a tf.function graph ---------------------------------------------------------------

def graph_position(graph: tf.Graph) -> int:
    """A marker for "ops created so far" in ``graph``: the highest op id."""
    return max(graph._nodes_by_id, default=0)


def _function_graphs(op: tf.Operation) -> list[Any]:
    """The bodies of a function-calling op (call, cond, case, while), if resolvable."""
    graphs = []
    for attr_name, attr in op.node_def.attr.items():
        names = ([attr.func.name] if attr.HasField("func")
                 else [f.name for f in attr.list.func])
        for name in names:
            if attr_name.startswith("_") or not name:
                continue
            function = op.graph._get_function(name)
            body = getattr(function, "graph", None) if function is not None else None
            if body is not None:
                graphs.append(body)
    return graphs


def _eager_captures(graph: Any) -> dict[int, Any]:
    """``id(eager handle)`` -> the tensor standing for it inside ``graph``
    (following captures through enclosing function graphs)."""
    outer = getattr(graph, "outer_graph", None)
    outer_map = _eager_captures(outer) if getattr(outer, "captures", None) else {}
    by_outer = {id(t): eager_id for eager_id, t in outer_map.items()}
    result = {}
    for external, internal in graph.captures:
        if isinstance(external, ops.EagerTensor):
            result[id(external)] = internal
        elif id(external) in by_outer:
            result[by_outer[id(external)]] = internal
    return result


def from_func_graph(graph: Any, until: int, recording: Recording) -> ForwardGraph:
    """The ops of ``graph`` created up to position ``until`` (see `graph_position`),
    marked with what ``recording`` says of their positions."""
    forward = ForwardGraph()
    counter = iter(range(1 << 62))
    copies = itertools.count(-1, -1)  # keys of inlined tensors (ids are positive)

    def add_op(op: tf.Operation, outside: str, key: Callable[[Any], int] = id) -> None:
        bodies = _function_graphs(op)
        if not bodies:
            custom = op.node_def.attr["_gradient_op_type"].s.decode() \
                if "_gradient_op_type" in op.node_def.attr else ""
            forward.add(Node(op.name, op.type, [key(t) for t in op.inputs],
                             [key(t) for t in op.outputs], [t.dtype for t in op.inputs],
                             [t.dtype for t in op.outputs], next(counter), outside,
                             custom_gradient=custom, _op=op))
            return
        for body in bodies:  # inline: outer inputs -> body inputs -> body -> outer outputs
            # A copy per call site: a function called twice is two computations, not one
            # whose inputs and outputs mix (a healthy call's path taken for a broken one's).
            copy = _copy_keys(copies)
            inner_inputs = list(body.inputs)
            outer_inputs = list(op.inputs)[len(op.inputs) - len(inner_inputs):]
            for outer, inner in zip(outer_inputs, inner_inputs, strict=False):
                forward.add(_link(op, (outer, key(outer)), (inner, copy(inner)),
                                  next(counter), outside))
            for inner_op in body.get_operations():
                if inner_op.type != "Placeholder":  # its value comes by the link above (as
                    add_op(inner_op, outside, copy)  # its producer, it cut the way back)
            # (A body may end in more outputs than a call takes: the intermediates that
            # TensorFlow appends for the gradient of another, differentiated, call of it.)
            if len(body.outputs) >= len(op.outputs):
                for inner, outer in zip(body.outputs, op.outputs, strict=False):
                    forward.add(_link(op, (inner, copy(inner)), (outer, key(outer)),
                                      next(counter), outside))

    for op in graph.get_operations():
        if op._id > until:
            break
        add_op(op, recording.outside(op._id))
    forward.handles = {eager: id(t) for eager, t in _eager_captures(graph).items()}
    return forward


def _copy_keys(keys: Iterator[int]) -> Callable[[Any], int]:
    """Keys for the tensors of one inlined copy of a function body, drawn from ``keys``."""
    given: dict[int, int] = {}

    def key(tensor: Any) -> int:
        if id(tensor) not in given:
            given[id(tensor)] = next(keys)
        return given[id(tensor)]

    return key


def _link(op: tf.Operation, source: tuple[Any, int], target: tuple[Any, int], order: int,
          outside: str) -> Node:
    """A node passing ``source`` to ``target`` (each a tensor and its key) across a call."""
    return Node(op.name, op.type, [source[1]], [target[1]], [source[0].dtype],
                [target[0].dtype], order, outside, link=True, _op=op)


# -- from eager execution -------------------------------------------------------------------

_CONVERSIONS = ("numpy", "__array__", "__float__", "__int__", "__index__", "__complex__")
#: NumPy reads eager tensors through the buffer protocol, which Python cannot intercept;
#: while recording, these NumPy entry points (and every ufunc) note tensor arguments.
_NUMPY_FUNCTIONS = ("array", "asarray", "asanyarray", "mean", "sum", "prod", "max", "min",
                    "amax", "amin", "round", "around", "clip", "std", "var", "average",
                    "argmax", "argmin", "where", "dot", "matmul", "stack", "concatenate")


class _NumpyWatch:
    """Stands in for a NumPy function or ufunc: notes eager tensor arguments, then calls
    it; attributes (``np.add.reduce``) pass through."""

    def __init__(self, function: Any, name: str, note: Callable[[Any, str], None]) -> None:
        self._function, self._name, self._note = function, name, note

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        for arg in args:
            if isinstance(arg, ops.EagerTensor):
                self._note(arg, f"numpy.{self._name}")
        return self._function(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._function, name)


#: What one eager recording may keep alive (its ops' outputs): a recording left running
#: after the step (interrupted in a notebook, or training over) would keep every tensor.
MAX_RECORDED_BYTES = 256 << 20


class EagerRecorder:
    """Records the eager ops of (about) one training step.

    `start` installs an op callback and wraps the ways a tensor leaves TensorFlow;
    `stop` removes them. Records ops of every thread while active, bounded by
    ``max_ops`` and ``max_bytes`` of tensors kept alive: past either, what was recorded
    is dropped and nothing is intercepted any more, but the recording stays `active` and
    `overflowed` until `stop` (the step's gradient call says it was not diagnosed). The
    training thread only pays for this while recording.
    """

    def __init__(self, max_ops: int = 200_000, max_bytes: int = MAX_RECORDED_BYTES) -> None:
        self.max_ops, self.max_bytes = max_ops, max_bytes
        self.graph = ForwardGraph()
        self.generation = 0  # counts recordings: positions are comparable within one
        self.active = False
        self.overflowed = False
        self._order = 0
        self._bytes = 0
        self._lock = threading.Lock()
        self._paused = False
        self._originals: dict[str, Any] = {}
        self._numpy_originals: dict[str, Any] = {}
        self._intercepting = False

    @property
    def position(self) -> int:
        return self._order

    def start(self) -> None:
        if self.active:
            return
        self.graph, self._order, self._bytes, self.overflowed = ForwardGraph(), 0, 0, False
        self.generation += 1
        # Active before anything is patched: a stop() after an interrupt in between
        # restores what was.
        self.active = self._intercepting = True
        op_callbacks.add_op_callback(self._on_op)
        base = ops._EagerTensorBase
        for name in _CONVERSIONS:
            original = base.__dict__.get(name)
            if original is not None:
                self._originals[name] = original
                setattr(base, name, self._conversion(name, original))
        self._originals["record_operation"] = record.record_operation
        record.record_operation = self._on_record_operation
        for name, value in vars(np).items():
            if isinstance(value, np.ufunc) or name in _NUMPY_FUNCTIONS:
                self._numpy_originals[name] = value
                setattr(np, name, _NumpyWatch(value, name, self._note_conversion))

    def stop(self) -> ForwardGraph:
        if self.active:
            self._stop_intercepting()
            self.active = False
        return self.graph

    def _stop_intercepting(self) -> None:
        if not self._intercepting:
            return
        self._intercepting = False
        try:
            op_callbacks.remove_op_callback(self._on_op)
        except KeyError:  # added on another thread (op callbacks are per thread), or not yet
            pass
        if "record_operation" in self._originals:
            record.record_operation = self._originals.pop("record_operation")
        for name, original in self._originals.items():
            setattr(ops._EagerTensorBase, name, original)
        self._originals.clear()
        for name, original in self._numpy_originals.items():
            setattr(np, name, original)
        self._numpy_originals.clear()

    def _overflow(self) -> None:
        """Past a bound (lock held): drops the recording and stops intercepting."""
        self.overflowed = True
        self.graph = ForwardGraph()
        self._stop_intercepting()

    @contextlib.contextmanager
    def paused(self) -> Iterator[ForwardGraph]:
        """The graph so far, left alone (no op of any thread recorded) while it is read:
        the recording goes on afterwards."""
        with self._lock:
            self._paused = True
        try:
            yield self.graph
        finally:
            with self._lock:
                self._paused = False

    def _next(self) -> int:
        self._order += 1
        return self._order

    def _on_op(self, op_type: Any, inputs: Any, attrs: Any, outputs: Any, op_name: Any = None,
               graph: Any = None) -> None:
        if graph is not None or self.overflowed:  # graph construction: not ours
            return None
        with self._lock:
            # (Not intercepting: a callback left on a thread that stop() was not called on.)
            if self._paused or not self._intercepting:
                return None
            inputs, outputs = list(inputs or ()), list(outputs or ())
            self._bytes += sum(_nbytes(t) for t in outputs)
            if len(self.graph.nodes) >= self.max_ops or self._bytes > self.max_bytes:
                self._overflow()
                return None
            if isinstance(op_type, bytes):
                op_type = op_type.decode()
            self.graph.keep_alive.extend(inputs + outputs)
            self.graph.add(Node(op_name or op_type, op_type, [id(t) for t in inputs],
                                [id(t) for t in outputs], [t.dtype for t in inputs],
                                [t.dtype for t in outputs], self._next(),
                                _source=caller_source()))
        return None

    def _on_record_operation(self, op_type: str, outputs: Any, inputs: Any, *args: Any,
                             **kwargs: Any) -> Any:
        """``tf.custom_gradient`` records its forward outputs with its own gradient."""
        with self._lock:
            for tensor in outputs:
                node = self.graph.producer.get(id(tensor))
                if node is not None:
                    node.custom_gradient = op_type
        return self._originals["record_operation"](op_type, outputs, inputs, *args, **kwargs)

    def _note_conversion(self, tensor: Any, how: str) -> None:
        if self.active and not self._paused and id(tensor) in self.graph.producer:
            with self._lock:
                self.graph.conversions.append(
                    Conversion(id(tensor), how, self._next(),
                               caller_source(stop_at_training_loop=False)))

    def _conversion(self, how: str, original: Callable[..., Any]) -> Callable[..., Any]:
        recorder = self

        def convert(tensor: Any, *args: Any, **kwargs: Any) -> Any:
            recorder._note_conversion(tensor, how)
            return original(tensor, *args, **kwargs)

        return convert
