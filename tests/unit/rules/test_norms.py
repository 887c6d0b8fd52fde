"""GradientExploding and GradientVanishing.

On collector state built by hand (`tests.support.rules`)."""

from __future__ import annotations

import numpy as np

from tests.support.rules import Harness, healthy


def test_exploding_absolute_limit():
    h = Harness(GradientExploding={"max_norm": 100.0})
    s = h.register()
    h.feed(s, {"present": [1, 1, 1], "norm": [1, 150, 1]})
    (alert,) = h.active("GradientExploding")
    assert alert.annotations["variables"] == "b"


def test_an_explosion_followed_by_a_nan_step_names_the_exploded_norm():
    """A diverging run: the norm explodes, then the batch's last step goes NaN. The alert
    said "Latest global norm 0" (the NaN, through max()); it names the largest finite
    global norm of the batch."""
    h = Harness(GradientExploding={"max_norm": 100.0})
    s = h.register()
    h.feed(s, {"present": [1, 1, 1], "norm": [1, 150, 1]},
           {"present": [1, 1, 1], "norm": [np.nan, 1, 1], "nan": [1, 0, 0]})
    (alert,) = h.active("GradientExploding")
    assert "Largest finite global norm of the latest batch 150" in alert.annotations[
        "description"], alert.annotations["description"]


def test_exploding_relative_to_rolling_median_needs_history():
    h = Harness(GradientExploding={"median_factor": 10.0, "min_steps": 5, "window_steps": 20})
    s = h.register()
    h.feed(s, {"present": [1, 1, 1], "norm": [1, 1, 50]})  # no history yet: quiet
    assert h.active("GradientExploding") == []
    for _ in range(6):
        h.feed(s, healthy())
    h.feed(s, healthy(norm=9.0))  # 9x the median: below the factor
    assert h.active("GradientExploding") == []
    h.feed(s, {"present": [1, 1, 1], "norm": [1, 1, 30]})
    (alert,) = h.active("GradientExploding")
    assert alert.annotations["variables"] == "c"
    h.feed(s, healthy())
    assert h.active("GradientExploding") == []


def test_nan_norms_are_nonfinite_not_exploding():
    h = Harness(GradientExploding={"min_steps": 1})
    s = h.register()
    h.feed(s, healthy(), {"present": [1, 1, 1], "norm": [np.nan, 1, 1], "nan": [1, 0, 0]})
    assert h.active("GradientExploding") == []
    assert h.active("GradientNonFinite")


def test_a_norm_that_overflowed_without_nan_or_inf_elements_is_exploding():
    """TensorFlow under XLA on an accelerator reports a finite gradient whose norm is
    beyond float32 as +Inf with no NaN or Inf element counted: an exploding gradient,
    not a non-finite one (and not nothing)."""
    h = Harness(GradientExploding={"min_steps": 1})
    s = h.register()
    h.feed(s, healthy(), {"present": [1, 1, 1], "norm": [1, np.inf, 1]})
    (alert,) = h.active("GradientExploding")
    assert alert.annotations["variables"] == "b"
    assert h.active("GradientNonFinite") == []
    h.feed(s, healthy(), {"present": [1, 1, 1], "norm": [1, np.inf, 1], "inf": [0, 3, 0]})
    assert h.active("GradientExploding") == [], "Inf elements: GradientNonFinite's"
    assert h.active("GradientNonFinite")


def test_vanishing_needs_consecutive_steps_on_every_replica():
    h = Harness(GradientVanishing={"steps": 3, "epsilon": 1e-6})
    s = h.register(replicas=2)
    zero_b = {"present": [[1, 1, 1], [1, 1, 1]], "norm": [[1, 0, 1], [1, 0, 1]]}
    only_one_replica = {"present": [[1, 1, 1], [1, 1, 1]], "norm": [[1, 0, 1], [1, 1, 1]]}
    h.feed(s, zero_b, zero_b, only_one_replica, zero_b, zero_b)  # streak broken at step 3
    assert h.active("GradientVanishing") == []
    h.feed(s, zero_b)
    (alert,) = h.active("GradientVanishing")
    assert alert.annotations["variables"] == "b"
    h.feed(s, {"present": [[1, 1, 1], [1, 1, 1]], "norm": [[1, 1, 1], [1, 1, 1]]})
    assert h.active("GradientVanishing") == []


def test_missing_is_not_vanishing():
    h = Harness(GradientVanishing={"steps": 2})
    s = h.register()
    b_missing = {"present": [1, 0, 1], "norm": [1, 0, 1]}
    h.feed(s, b_missing, b_missing, b_missing)
    assert h.active("GradientVanishing") == []
    assert h.active("GradientMissing")


def test_steps_without_any_gradient_are_no_history_for_the_median():
    """A job that lost every gradient for a while (norm 0 at each such step), then
    recovered: the first healthy step was "100x the median" of those zeros, and paged
    GradientExploding on a run that had just been fixed."""
    h = Harness(GradientExploding={"min_steps": 5})
    s = h.register()
    for _ in range(3):
        h.feed(s, healthy(norm=1.0))
    for _ in range(10):
        h.feed(s, {"present": [0, 0, 0], "norm": [0, 0, 0]})
    h.feed(s, healthy(norm=1.5))
    h.clock.now += 1
    h.engine.tick(h.registry.groups.values())
    assert h.active("GradientExploding") == []
