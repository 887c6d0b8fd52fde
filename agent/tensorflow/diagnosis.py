"""Why did a variable get no gradient? One verdict per variable, from the forward graph.

`Diagnoser` walks a `ForwardGraph` from the variable's resource handle towards
the loss. The gradient registry decides which ops pass a gradient on:

- **unused**: no op reads the variable (a layer that is never called);
- **not_on_loss_path**: read, but nothing read from it reaches the loss (a metric);
- **left_tensorflow**: (eager) a value derived from it became a host value
  (``.numpy()``, ``float()``, NumPy) and came back as a constant;
- **broken_at_op**: every path to the loss crosses an op that passes no gradient
  (``StopGradient``, comparisons, ``Floor``/``Round``/``ArgMax``, a cast to an
  integer, no registered gradient, a ``tf.custom_gradient`` returning None);
- **outside_tape**: the path exists but ran before the ``GradientTape`` started;
- **unknown**: none of the above explains it.
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.python.framework import ops

from gradwatch.agent.core.diagnosis import Cause, Diagnosis, Source
from gradwatch.agent.tensorflow.forward_graph import ForwardGraph, Node

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
    "no_gradient": "register a gradient for this op (tf.RegisterGradient) or avoid it on the "
                   "path to the loss.",
    Cause.UNUSED: "call the layer in the forward pass, or remove it (or set "
                  "trainable=False) if it is not meant to train.",
    Cause.NOT_ON_LOSS_PATH: "add its output to the loss, or exclude the variable from the "
                            "optimizer (trainable=False).",
    Cause.LEFT_TENSORFLOW: "keep the math in TensorFlow ops (tf.math instead of NumPy, no "
                           ".numpy() or float() inside the loss).",
    Cause.OUTSIDE_TAPE: "compute the forward pass inside the `with tf.GradientTape()` block.",
}
HINTS["Ceil"] = HINTS["Rint"] = HINTS["Floor"]
HINTS["ArgMin"] = HINTS["ArgMax"]
HINTS["FloorDiv"] = HINTS["TruncateDiv"] = "use tf.math.divide (true division)."

_COMPARISONS = frozenset({"Less", "LessEqual", "Greater", "GreaterEqual", "Equal", "NotEqual"})


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
    if "int" in why:
        return HINTS["Cast"]
    return ""


def _at(variable: str, cause: Cause, node: Node, reason: str = "", hint: str = "") -> Diagnosis:
    return Diagnosis(variable, cause, node.name, node.type, node.source, reason,
                     hint or HINTS.get(cause, ""))


class Diagnoser:
    """Diagnoses the variables of one gradient call: ``targets`` are the loss tensors'
    keys in ``graph``. What depends only on the loss is computed once for all variables."""

    def __init__(self, graph: ForwardGraph, targets: list[int]) -> None:
        self.graph = graph
        self.targets = set(targets)
        self.upstream = graph.ancestors(targets)
        #: Where a gradient of the loss would arrive: behind a stopping op on this set
        #: lies the break (not behind one on a side branch, e.g. batch norm's moments).
        self.live = graph.gradient_reachable(targets, why_blocked)
        self._everything = set(graph.producer)

    def _break(self, stopped: list[tuple[Node, str]]) -> tuple[Node, str]:
        on_path = [s for s in stopped if any(out in self.live for out in s[0].outputs)]
        return min(on_path or stopped, key=lambda s: s[0].order)

    def diagnose(self, variable: str, handles: list[int]) -> Diagnosis:
        """The verdict for ``variable``, whose resource handles (eager ids) are ``handles``,
        given that its gradient was None."""
        graph, upstream, targets = self.graph, self.upstream, self.targets
        start = [graph.handles.get(h, h) for h in handles]
        readers = _readers(graph, start)
        if not readers:
            return Diagnosis(variable, Cause.UNUSED, hint=HINTS[Cause.UNUSED])
        downstream, _ = graph.flow(start, self._everything, lambda node, index: None)
        if not downstream & upstream:
            conversion = _round_trip(graph, downstream, upstream)
            if conversion is not None:
                node, how, source = conversion
                return Diagnosis(variable, Cause.LEFT_TENSORFLOW, node.name, node.type, source,
                                 how, HINTS[Cause.LEFT_TENSORFLOW])
            return _at(variable, Cause.NOT_ON_LOSS_PATH, _first_user_node(readers))
        reached, stopped = graph.flow(start, upstream, why_blocked)
        if not reached & targets:
            node, why = self._break(stopped)
            return _at(variable, Cause.BROKEN_AT_OP, node, why, _hint(node, why))

        def outside_tape(node: Node, index: int) -> str | None:
            return why_blocked(node, index) or (None if node.recorded else "outside")

        reached, stopped = graph.flow(start, upstream, outside_tape)
        if not reached & targets:
            node = min((n for n, why in stopped if why == "outside"), key=lambda n: n.order)
            return _at(variable, Cause.OUTSIDE_TAPE, node)

        def custom(node: Node, index: int) -> str | None:
            return why_blocked(node, index) or (
                f"has a custom gradient ({node.custom_gradient}) that returns None"
                if node.custom_gradient else None)

        reached, stopped = graph.flow(start, upstream, custom)
        if not reached & targets:
            node, why = self._break(stopped)
            return _at(variable, Cause.BROKEN_AT_OP, node, why, _hint(node, why))
        return Diagnosis(variable, Cause.UNKNOWN)


def _readers(graph: ForwardGraph, handles: list[int]) -> list[Node]:
    """Ops that read a value from the handles (through function boundaries), not the
    ones that only check or assign (``VarIsInitializedOp``, ``AssignVariableOp``)."""
    def passes_handle(node: Node, index: int) -> str | None:
        return None if node.link or set(node.output_dtypes) == {tf.resource} else "reads"

    _, readers = graph.flow(handles, set(graph.producer), passes_handle)
    return sorted((node for node, _ in readers
                   if any(_carries_gradient(d) and d != tf.resource for d in node.output_dtypes)),
                  key=lambda n: n.order)


def _first_user_node(readers: list[Node]) -> Node:
    """The reader of the variable to point at: the first with a user source line."""
    for node in readers:
        if node.source is not None:
            return node
    return readers[0]


def _round_trip(graph: ForwardGraph, downstream: set[int], upstream: set[int]
                ) -> tuple[Node, str, Source | None] | None:
    """A conversion of a tensor computed from the variable, followed by a host-made
    tensor that the loss depends on: the value left TensorFlow and came back."""
    host_made = [graph.first_seen.get(k, 1 << 62) for k in upstream if k not in graph.producer]
    for conversion in graph.conversions:
        if conversion.tensor in downstream and any(t > conversion.order for t in host_made):
            node = graph.producer[conversion.tensor]
            return node, f"via {conversion.how}", conversion.source
    return None
