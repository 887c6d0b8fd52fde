"""What gradwatch needs to know about a TensorFlow or Keras variable."""

from __future__ import annotations

from typing import Any

from tensorflow.python.framework import ops

from gradwatch.agent.core.session import Variable


def variable_name(variable: Any) -> str:
    """Keras 3 variables have a unique ``path``; tf.Variables a ``name`` ending in ``:0``."""
    name = getattr(variable, "path", None) or getattr(variable, "name", None) or "variable"
    return name[:-2] if name.endswith(":0") else name


def _overwritten(variable: Any) -> bool:
    """The optimizer overwrites it with what it is given (``overwrite_with_gradient``: Keras
    3's float8 scales and amax histories, whose "gradients" are their new values)."""
    return bool(getattr(variable, "overwrite_with_gradient", False))


def gradient_variables(variables: list) -> list:
    """The variables that get gradients (not `_overwritten` ones)."""
    return [v for v in variables if not _overwritten(v)]


def gradient_pairs(grads: list, variables: list) -> tuple[list, list]:
    """The (gradient, variable) pairs whose gradient is one (see `gradient_variables`)."""
    if not any(_overwritten(v) for v in variables):
        return grads, variables
    kept = [(g, v) for g, v in zip(grads, variables, strict=True) if not _overwritten(v)]
    return [g for g, _ in kept], [v for _, v in kept]


def describe(variable: Any) -> Variable:
    """The variable as a session's table holds it."""
    shape = tuple(-1 if d is None else int(d) for d in getattr(variable, "shape", ()))
    dtype = getattr(variable, "dtype", "")
    return Variable(variable_name(variable), shape, getattr(dtype, "name", str(dtype)),
                    id(variable))


def tf_variables(variable: Any) -> list[Any]:
    """The TensorFlow variables with an eager resource handle behind ``variable`` (a
    tf.Variable, a Keras 3 variable, a distributed variable: one per replica)."""
    found: list[Any] = []
    pending = [variable]
    while pending:
        value = pending.pop()
        if type(value).__module__.startswith("keras"):  # Keras 3 variable: wraps a tf one
            pending.append(getattr(value, "_value", None))
            continue
        components = getattr(value, "values", None)  # DistributedVariable
        if isinstance(components, tuple) and components and components[0] is not value:
            pending.extend(components)
            continue
        try:
            handle = value.handle
        except Exception:
            continue
        if isinstance(handle, ops.EagerTensor):
            found.append(value)
    return found


def variable_handles(variable: Any) -> list[int]:
    """ids of the eager resource handles behind ``variable`` (see `tf_variables`), empty
    if none."""
    return [id(v.handle) for v in tf_variables(variable)]
