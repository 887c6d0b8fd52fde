"""Why did a variable get no gradient? One verdict per variable, from the forward graph.

`Diagnoser` walks a `ForwardGraph` from the variable's resource handle towards
the loss. The gradient registry decides which ops pass a gradient on:

- **not_tracked**: TensorFlow never differentiates it: an integer variable, or a
  tape made with ``watch_accessed_variables=False`` that was not told to watch it;
- **unused**: no op reads the variable (a layer that is never called);
- **outside_tape**: the path to the loss exists but some of it ran while the tape
  was not recording: before its ``with`` block, after it, in ``stop_recording()``,
  or once outside the step (a tensor computed in ``build()`` and stored next to the
  variable, used by the step instead of the variable);
- **not_on_loss_path**: read, but nothing read from it reaches the loss (a metric);
- **left_tensorflow**: (eager) a value derived from it became a host value
  (``.numpy()``, ``float()``, NumPy) and came back as a constant;
- **broken_at_op**: every path to the loss crosses an op that passes no gradient
  (``StopGradient``, comparisons, ``Floor``/``Round``/``ArgMax``, a cast to an
  integer, no registered gradient, a ``tf.custom_gradient`` returning None, a write
  into a state variable that the loss reads back, as a ``keras.metrics`` object does);
- **unknown**: none of the above explains it.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from typing import Any

import tensorflow as tf
from tensorflow.python.framework import ops

from gradwatch.agent.core.diagnosis import Cause, Diagnosis, Source
from gradwatch.agent.tensorflow.forward_graph import ForwardGraph, Node, Recording
from gradwatch.agent.tensorflow.variables import variable_handles, variable_name

#: Ops whose registered gradient returns None for every input.
NONE_GRADIENTS = frozenset({
    "Floor", "Ceil", "Round", "Rint", "FloorDiv", "TruncateDiv", "ArgMax", "ArgMin",
})

HINTS = {
    "Floor": "use a straight-through estimator, x + tf.stop_gradient(tf.floor(x) - x), "
             "or a smooth surrogate.",
    "Round": "use a straight-through estimator, x + tf.stop_gradient(tf.round(x) - x).",
    "ArgMax": "use tf.nn.softmax (soft selection) instead of argmax inside the loss.",
    "StopGradient": "remove tf.stop_gradient from the path to the loss, or make the "
                    "variable non-trainable if freezing it is intended.",
    "Cast": "keep the value in a floating-point dtype on the path to the loss.",
    "comparison": "comparisons have no gradient; use a smooth relaxation "
                  "(e.g. tf.sigmoid(k * (a - b))) instead of a boolean test.",
    "custom_gradient": "make the tf.custom_gradient grad_fn return a tensor for this input.",
    "not_differentiable": "replace it on the path to the loss with a differentiable op.",
    "Multinomial": "sampling has no gradient: put the log-probability of the sampled value "
                   "in the loss (REINFORCE), or use a reparameterised sample (Gumbel-softmax).",
    "PyFunc": "tf.numpy_function has no gradient: write the computation with TensorFlow ops, "
              "or give it one with tf.custom_gradient.",
    "no_gradient": "register a gradient for this op (tf.RegisterGradient) or avoid it on the "
                   "path to the loss.",
    Cause.UNUSED: "call the layer in the forward pass, or remove it (or set "
                  "trainable=False) if it is not meant to train.",
    Cause.NOT_ON_LOSS_PATH: "add its output to the loss, or exclude the variable from the "
                            "optimizer (trainable=False).",
    Cause.LEFT_TENSORFLOW: "keep the math in TensorFlow ops (tf.math instead of NumPy; no "
                           ".numpy(), float() or model.predict() inside the loss: call the "
                           "model itself).",
    Recording.BEFORE: "compute the forward pass inside the `with tf.GradientTape()` block.",
    Recording.AFTER: "compute the loss inside the `with tf.GradientTape()` block: every op "
                     "from the variables to the loss must run while the tape records.",
    Recording.BETWEEN: "run every op from the variables to the loss while the tape records "
                       "(inside its `with` block, not in tape.stop_recording()).",
    "stored": "compute the tensor from the variables inside call(), so that every step "
              "reads them.",
    "integer": "create it with a floating-point dtype, or with trainable=False if it holds "
               "a count or an index.",
    "unwatched": "call tape.watch() on it inside the `with` block (a Keras variable: "
                 "tape.watch(variable.value)), or leave watch_accessed_variables at True.",
    "untrainable": "make it trainable if it is meant to train (and pass it to the optimizer), "
                   "or leave it out of the variables whose gradients you take.",
    "state": "compute the loss from tensors (keras.losses, tf ops), not from a keras.metrics "
             "object or a variable assigned in the step: reading a variable back passes no "
             "gradient to what was written into it.",
}
HINTS["Ceil"] = HINTS["Rint"] = HINTS["Floor"]
HINTS["ArgMin"] = HINTS["ArgMax"]
HINTS["StatelessMultinomial"] = HINTS["Multinomial"]
HINTS["FloorDiv"] = HINTS["TruncateDiv"] = "use tf.math.divide (true division)."

_COMPARISONS = frozenset({"Less", "LessEqual", "Greater", "GreaterEqual", "Equal", "NotEqual"})
#: Ops that write a value into a resource variable (their input 0 is its handle).
_WRITES = frozenset({"AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp",
                     "ResourceScatterUpdate", "ResourceScatterAdd", "ResourceScatterSub",
                     "ResourceScatterNdUpdate", "ResourceScatterNdAdd"})


def _carries_gradient(dtype: tf.DType) -> bool:
    return dtype.is_floating or dtype.is_complex or dtype in (tf.resource, tf.variant)


def _gradient_function(op_type: str) -> tuple[bool, object]:
    try:
        return True, ops._gradient_registry.lookup(op_type)
    except LookupError:
        return False, None


def why_blocked(node: Node, index: int) -> str | None:
    """Why ``node`` passes no gradient from input ``index`` to its outputs, or None."""
    if node.link:
        return None
    if not _carries_gradient(node.input_dtypes[index]):
        return f"takes a {node.input_dtypes[index].name} input"
    if node.custom_gradient:
        return None  # judged last, see `diagnose`
    registered, function = _gradient_function(node.type)
    if not registered:
        return "has no registered gradient"
    if function is None:
        return "is not differentiable"
    if node.type in NONE_GRADIENTS:
        return "has a gradient defined as None"
    if node.output_dtypes and not any(_carries_gradient(d) for d in node.output_dtypes):
        dtypes = ", ".join(sorted({d.name for d in node.output_dtypes}))
        source = node.input_dtypes[index].name
        return (f"casts {source} to {dtypes}" if node.type == "Cast"
                else f"outputs {dtypes}, which carries no gradient")
    return None


def _hint(node: Node, why: str) -> str:
    if node.custom_gradient:
        return HINTS["custom_gradient"]
    if node.type in HINTS:
        return HINTS[node.type]
    if node.type in _COMPARISONS or "bool" in why:
        return HINTS["comparison"]
    if why == "has no registered gradient":
        return HINTS["no_gradient"]
    if why == "is not differentiable":
        return HINTS["not_differentiable"]
    if "int" in why:
        return HINTS["Cast"]
    return ""


def _at(variable: str, cause: Cause, node: Node, reason: str = "", hint: str = "") -> Diagnosis:
    return Diagnosis(variable, cause, node.name, node.type, node.source, reason,
                     hint or HINTS.get(cause, ""))


class Diagnoser:
    """Diagnoses the variables of one gradient call: ``targets`` are the loss tensors'
    keys in ``graph``; ``watched`` the resource handles (eager ids) the tape watches when
    it was made with ``watch_accessed_variables=False`` (None: it watches what it reads).
    What depends only on the loss is computed once for all variables."""

    def __init__(self, graph: ForwardGraph, targets: list[int],
                 watched: set[int] | None = None) -> None:
        self.graph = graph
        self.targets = set(targets)
        self.watched = watched
        self.upstream = graph.ancestors(targets)
        #: Where a gradient of the loss would arrive: behind a stopping op on this set
        #: lies the break (not behind one on a side branch, e.g. batch norm's moments).
        self.live = graph.gradient_reachable(targets, why_blocked)
        self._everything = set(graph.producer)

    def _break(self, stopped: list[tuple[Node, str]]) -> tuple[Node, str] | None:
        """The op to blame among those that stopped the walk (None if none did: the walk
        lost the path inside a function it cannot see into, a restored SavedModel's)."""
        if not stopped:
            return None
        on_path = [s for s in stopped if any(out in self.live for out in s[0].outputs)] \
            or stopped
        # A comparison that only chooses between values (``tf.where``'s condition, as
        # Keras's argmax guards against -0.0) is not the break where another op is.
        breaking = [s for s in on_path if not self._chooses(s[0])] or on_path
        return min(breaking, key=lambda s: s[0].order)

    def _chooses(self, node: Node, depth: int = 0) -> bool:
        """Whether ``node``'s outputs are only ``tf.where`` conditions, directly or through
        ops of integer or boolean results (a sign bit's bitcast, ``tf.logical_and``...)."""
        uses = [(consumer, out) for out in node.outputs
                for consumer in self.graph.consumers.get(out, ())]
        return (bool(uses) or depth > 0) and depth < 8 and all(
            (consumer.type in ("Select", "SelectV2") and consumer.inputs[0] == out)
            or (not any(d.is_floating or d.is_complex for d in consumer.output_dtypes)
                and self._chooses(consumer, depth + 1))
            for consumer, out in uses)

    def diagnose_all(self, variables: list[Any]) -> list[Diagnosis]:
        """The verdicts for ``variables`` (tf or Keras variables), whose gradients were
        None, in their order."""
        verdicts = [self.diagnose(v) for v in variables]
        unused = [i for i, d in enumerate(verdicts) if d.cause is Cause.UNUSED]
        if unused:  # one heap scan for all of them: see `_stored_tensors`
            stored = _stored_tensors([variables[i] for i in unused])
            for i in unused:
                verdicts[i] = self._stored_read(verdicts[i], stored.get(id(variables[i]), ()))
        return verdicts

    def diagnose(self, variable: Any) -> Diagnosis:
        """The verdict for one variable whose gradient was None."""
        name, graph, upstream, targets = variable_name(variable), self.graph, self.upstream, \
            self.targets
        handles = variable_handles(variable)
        start = [graph.handles.get(h, h) for h in handles]
        dtype = tf.as_dtype(getattr(variable, "dtype", tf.float32))
        if not _carries_gradient(dtype):
            reader = _first_user_node(_readers(graph, start, any_dtype=True))
            return Diagnosis(name, Cause.NOT_TRACKED, *_op_fields(reader),
                             f"its dtype is {dtype.name}: only floating-point variables get "
                             "gradients", HINTS["integer"])
        if getattr(variable, "trainable", True) is False:  # the tape watches trainable ones
            return Diagnosis(name, Cause.NOT_TRACKED, *_op_fields(_first_user_node(
                _readers(graph, start))), "it is not trainable (trainable=False), and a "
                "GradientTape watches only trainable variables unless told to",
                HINTS["untrainable"])
        readers = _readers(graph, start)
        if not readers:
            return Diagnosis(name, Cause.UNUSED, hint=HINTS[Cause.UNUSED])
        if self.watched is not None and not set(handles) & self.watched:
            return Diagnosis(name, Cause.NOT_TRACKED, *_op_fields(_first_user_node(readers)),
                             "the GradientTape was made with watch_accessed_variables=False "
                             "and this variable was not passed to tape.watch()",
                             HINTS["unwatched"])
        downstream, _ = graph.flow(start, self._everything, lambda node, index: None)
        if not downstream & upstream:
            conversion = _round_trip(graph, downstream, upstream)
            if conversion is not None:
                node, how, source = conversion
                return Diagnosis(name, Cause.LEFT_TENSORFLOW, node.name, node.type, source,
                                 how, HINTS[Cause.LEFT_TENSORFLOW])
            write = self._write_read_back(downstream)
            if write is not None:
                return _at(name, Cause.BROKEN_AT_OP, write,
                           "writes a value computed from it into a variable that the loss "
                           "reads back",
                           HINTS["state"])
            if all(reader.outside for reader in readers):
                # Read only while the tape was not recording, and not for the loss: after
                # the update (logging, check_numerics) or before the step. Not computed with.
                return Diagnosis(name, Cause.UNUSED, hint=HINTS[Cause.UNUSED])
            return _at(name, Cause.NOT_ON_LOSS_PATH, _first_user_node(readers))

        def broken_at(blocked) -> Diagnosis | None:
            """The verdict if ``blocked`` cuts every path to the loss: the op to blame."""
            reached, stopped = graph.flow(start, upstream, blocked)
            if reached & targets:
                return None
            blamed = self._break(stopped)
            if blamed is None:
                return Diagnosis(name, Cause.UNKNOWN)
            node, why = blamed
            return _at(name, Cause.BROKEN_AT_OP, node, why, _hint(node, why))

        verdict = broken_at(why_blocked)
        if verdict is not None:
            return verdict

        def outside_tape(node: Node, index: int) -> str | None:
            return why_blocked(node, index) or node.outside or None

        reached, stopped = graph.flow(start, upstream, outside_tape)
        if not reached & targets:
            node, why = min(((n, why) for n, why in stopped if why == n.outside),
                            key=lambda s: s[0].order)
            return _at(name, Cause.OUTSIDE_TAPE, node, why, HINTS[why])

        def custom(node: Node, index: int) -> str | None:
            return why_blocked(node, index) or (
                f"has a custom gradient ({node.custom_gradient}) that returns None"
                if node.custom_gradient else None)

        return broken_at(custom) or Diagnosis(name, Cause.UNKNOWN)

    def _write_read_back(self, downstream: set[int]) -> Node | None:
        """The first op writing a value computed from the variable into a (state) variable
        whose value the loss then reads."""
        graph = self.graph
        writes = sorted({id(n): n for key in downstream for n in graph.consumers.get(key, ())
                         if n.type in _WRITES and n.inputs[0] not in downstream}.values(),
                        key=lambda n: n.order)
        for write in writes:
            if any(set(reader.outputs) & self.upstream
                   for reader in _readers(graph, [write.inputs[0]])):
                return write
        return None

    def _stored_read(self, unused: Diagnosis, stored: Iterable[tuple[str, Any]]) -> Diagnosis:
        """An unused variable whose owner keeps a tensor that the step uses on the path to
        the loss: computed from the variable once (in ``build()``), read instead of it."""
        graph = self.graph
        for attribute, tensor in stored:
            key = graph.handles.get(id(tensor), id(tensor))
            users = [n for n in graph.consumers.get(key, ()) if set(n.outputs) & self.upstream]
            if users:
                node = _first_user_node(sorted(users, key=lambda n: n.order))
                return _at(unused.variable, Cause.OUTSIDE_TAPE, node,
                           f"uses {attribute}, a tensor stored next to the variable (computed "
                           "from it once, outside the step, e.g. in build()), and the step "
                           "never reads the variable", HINTS["stored"])
        return unused


def _op_fields(node: Node | None) -> tuple[str, str, Source | None]:
    return (node.name, node.type, node.source) if node is not None else ("", "", None)


def _stored_tensors(variables: list[Any]) -> dict[int, list[tuple[str, Any]]]:
    """For each variable (by id), the tensors (not variables) of its size kept as
    attributes of the objects that hold it (Keras layers, ``tf.Module``s, a module's
    globals), each with a name like ``noisy.kernel``: what ``build()`` computes from a
    variable once (a transpose, a scaled or noisy copy) keeps its size; other tensors kept
    there (the input data next to a loop's variable, a layer's constant) are not
    suspects. One scan of the heap (``gc.get_referrers``, ~0.1 s)."""
    wanted = {id(v): _size(v) for v in variables}
    found: dict[int, list[tuple[str, Any]]] = {}
    for namespace in gc.get_referrers(*variables):
        if not isinstance(namespace, dict) or "__builtins__" in namespace:
            continue  # (a module's globals: a script's data and loop variables, not state)
        held = [id(v) for v in namespace.values() if id(v) in wanted]
        if not held:
            continue
        owner = namespace.get("name") or namespace.get("__name__")
        prefix = f"{owner}." if isinstance(owner, str) else ""
        tensors = []
        for attribute, value in list(namespace.items()):
            values = value if isinstance(value, (list, tuple)) else [value]
            for i, item in enumerate(values):
                if isinstance(item, ops.EagerTensor) and item.dtype != tf.resource:
                    index = f"[{i}]" if values is value else ""
                    tensors.append((f"{prefix}{attribute}{index}", item))
        for variable_id in held:
            found.setdefault(variable_id, []).extend(
                (name, t) for name, t in tensors if _size(t) == wanted[variable_id])
    return found


def _size(value: Any) -> int | None:
    """Elements of a tensor or variable of known shape, else None."""
    shape = getattr(value, "shape", None)
    return None if shape is None else tf.TensorShape(shape).num_elements()


def _readers(graph: ForwardGraph, handles: list[int], any_dtype: bool = False) -> list[Node]:
    """Ops that read a value from the handles (through function boundaries), not the
    ones that only check or assign (``VarIsInitializedOp``, ``AssignVariableOp``); only
    those reading a value that can carry a gradient unless ``any_dtype``."""
    def passes_handle(node: Node, index: int) -> str | None:
        return None if node.link or set(node.output_dtypes) == {tf.resource} else "reads"

    _, readers = graph.flow(handles, set(graph.producer), passes_handle)
    return sorted((node for node, _ in readers
                   if any((any_dtype or _carries_gradient(d)) and d != tf.resource
                          for d in node.output_dtypes)),
                  key=lambda n: n.order)


def _first_user_node(nodes: list[Node]) -> Node | None:
    """The node to point at: the first with a user source line."""
    for node in nodes:
        if node.source is not None:
            return node
    return nodes[0] if nodes else None


def _round_trip(graph: ForwardGraph, downstream: set[int], upstream: set[int]
                ) -> tuple[Node, str, Source | None] | None:
    """A conversion of a tensor computed from the variable, followed by a host-made
    tensor that the loss depends on: the value left TensorFlow and came back. Not the
    variable's own value read out while no tape recorded (weights logged before the step,
    as logging callbacks do: any later batch made from NumPy would look like its return)."""
    host_made = [graph.first_seen.get(k, 1 << 62) for k in upstream if k not in graph.producer]
    for conversion in graph.conversions:
        node = graph.producer.get(conversion.tensor)
        if node is None or (node.outside and node.type in _READS):
            continue
        if conversion.tensor in downstream and any(t > conversion.order for t in host_made):
            return node, f"via {conversion.how}", conversion.source
    return None


#: Ops that read a variable's value as it is.
_READS = frozenset({"ReadVariableOp", "Identity"})
