"""Hooks into optimizers so that every ``(gradient, variable)`` pair is seen.

Keras 3 optimizers funnel ``apply_gradients`` and ``model.fit`` into
``apply(grads, trainable_variables)``; tf-keras (Keras 2) optimizers into
``apply_gradients(grads_and_vars)``. We patch the *instance* (never the
class), before the optimizer filters out ``None`` gradients.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import tensorflow as tf

log = logging.getLogger(__name__)

#: ``on_gradients(optimizer, grads, variables)``: called in the caller's
#: context (eager, ``tf.function`` trace, replica context) before the update.
GradientHook = Callable[[Any, Sequence[Any], Sequence[Any]], None]
#: ``on_rejected(optimizer, grads, variables, error)``: the update raised.
RejectionHook = Callable[[Any, Sequence[Any], Sequence[Any], Exception], None]
#: ``on_build(optimizer, variables)``: the optimizer learned its variables (usually
#: eagerly, in cross-replica context: the moment to allocate per-session state).
BuildHook = Callable[[Any, Sequence[Any]], None]


class Hooks(NamedTuple):
    """Where a wrapped optimizer reports: one monitor's callbacks."""

    on_gradients: GradientHook
    on_rejected: RejectionHook
    on_build: BuildHook


_HOOKS = "_gradwatch_hooks"


def _aggregated_already(optimizer: Any) -> None:
    """tf-keras: ``apply_gradients`` told not to aggregate is given gradients summed across
    replicas already (by the loop's own all-reduce, or by tf-keras's ``LossScaleOptimizer``,
    which ``compile`` wraps the optimizer in under a ``mixed_float16`` policy): says so
    once, where replicas differ."""
    if getattr(optimizer, "_gradwatch_told_aggregated", False) or \
            tf.distribute.get_strategy().num_replicas_in_sync < 2:
        return
    object.__setattr__(optimizer, "_gradwatch_told_aggregated", True)
    log.warning("gradwatch: %s is given gradients already summed across replicas "
                "(experimental_aggregate_gradients=False: reduced by the loop itself, or by "
                "tf-keras's LossScaleOptimizer, which compile() adds under a mixed_float16 "
                "policy): its norms are those after the all-reduce, the same on every "
                "replica. To measure each replica's own, call monitor.observe() on them "
                "before the loop reduces them, or wrap model.optimizer after compile().",
                type(optimizer).__name__)


def wrap_optimizer(optimizer: Any, hooks: Hooks) -> Any:
    """Patches ``optimizer`` in place and returns it. Wrapping it again only points it
    at the new ``hooks`` (a new monitor's; functions traced before keep calling the
    ones they were traced with)."""
    wrapped = hasattr(optimizer, _HOOKS)
    # Past Keras's and tf.Module's attribute tracking: this is not optimizer state.
    object.__setattr__(optimizer, _HOOKS, hooks)
    if wrapped:
        return optimizer

    def current() -> Hooks:
        return getattr(optimizer, _HOOKS)

    # Called from users' functions, which AutoGraph converts (and with them what they call,
    # unless told not to): gradwatch's code runs as written.
    unconverted = tf.autograph.experimental.do_not_convert

    if callable(getattr(optimizer, "build", None)):
        original_build = optimizer.build

        @functools.wraps(original_build)
        def build(variables, *args, **kwargs):
            result = original_build(variables, *args, **kwargs)
            current().on_build(optimizer, list(variables))
            return result

        optimizer.build = unconverted(build)
    if callable(getattr(optimizer, "apply", None)) and hasattr(optimizer, "_trainable_variables"):
        original = optimizer.apply

        @functools.wraps(original)
        def apply(grads, trainable_variables=None):
            grads = list(grads)
            variables = (list(trainable_variables) if trainable_variables is not None
                         else list(optimizer._trainable_variables))
            given = None if trainable_variables is None else variables  # (an iterator: read)
            if len(variables) != len(grads):  # not built yet, or a mistake: Keras says which
                return original(grads, given)
            current().on_gradients(optimizer, grads, variables)
            try:
                return original(grads, given)
            except ValueError as error:
                current().on_rejected(optimizer, grads, variables, error)
                raise

        optimizer.apply = unconverted(apply)
    elif callable(getattr(optimizer, "apply_gradients", None)):
        original = optimizer.apply_gradients

        @functools.wraps(original)
        def apply_gradients(grads_and_vars, *args, **kwargs):
            if kwargs.get("skip_gradients_aggregation") or \
                    kwargs.get("experimental_aggregate_gradients") is False:
                _aggregated_already(optimizer)
            pairs = list(grads_and_vars)
            grads = [g for g, _ in pairs]
            variables = [v for _, v in pairs]
            current().on_gradients(optimizer, grads, variables)
            try:
                return original(pairs, *args, **kwargs)
            except ValueError as error:
                current().on_rejected(optimizer, grads, variables, error)
                raise

        optimizer.apply_gradients = unconverted(apply_gradients)
    else:
        raise TypeError(
            f"gradwatch cannot wrap {type(optimizer).__name__}: expected a Keras optimizer "
            "with apply() or apply_gradients(); use GradientMonitor.observe() instead"
        )
    return optimizer
