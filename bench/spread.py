"""The spread of paired measurements: what every side-by-side benchmark reports.

Run on the step times `bench.agent_overhead --save` writes, it prints each variant's
ratio of median step times to plain with a 95 % bootstrap interval over rounds, and
the differences between gradwatch and the A/A control (``plain_again``) and, where
measured, between gradwatch and its ``unchecked`` variant:

    .venv/bin/python -m bench.spread steps.json [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence

import numpy as np


def round_ratios(measured: Sequence[float], baseline: Sequence[float]
                 ) -> tuple[float, float, float]:
    """Median, lower and upper quartile of ``measured[i] / baseline[i]`` (rounds paired)."""
    ratios = sorted(m / b for m, b in zip(measured, baseline, strict=True))
    return (statistics.median(ratios), ratios[len(ratios) // 4],
            ratios[(3 * len(ratios)) // 4])


def bootstrap_ratios(blocks: dict[str, np.ndarray], baseline: str = "plain",
                     resamples: int = 2000, seed: int = 0) -> dict[str, np.ndarray]:
    """``blocks``: variant → step times ``[rounds, steps]``. Ratios of median step times to
    ``baseline``, for the rounds as measured (element 0) and ``resamples`` resamplings of
    the rounds with replacement (the same rounds for every variant)."""
    rounds = len(blocks[baseline])
    rng = np.random.default_rng(seed)
    picks = [np.arange(rounds)] + [rng.integers(0, rounds, rounds) for _ in range(resamples)]
    base = np.array([np.median(blocks[baseline][p]) for p in picks])
    return {variant: np.array([np.median(times[p]) for p in picks]) / base
            for variant, times in blocks.items() if variant != baseline}


#: Differences of ratios worth an interval: the agent against the A/A control, and
#: what the finiteness check adds (``bench.agent_overhead``'s unchecked variant).
DIFFERENCES = (("gradwatch", "plain_again"), ("unchecked", "plain_again"),
               ("gradwatch", "unchecked"))


def interval(samples: np.ndarray, form: str = ".3f") -> str:
    """Element 0 (as measured) and the 95 % interval of the others (resampled)."""
    low, high = np.percentile(samples[1:], [2.5, 97.5])
    return f"{samples[0]:{form}} [{low:{form}}, {high:{form}}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="JSON from bench.agent_overhead --save")
    parser.add_argument("--steps", type=int, default=3, help="steps per block in that run")
    args = parser.parse_args()
    with open(args.path) as saved:
        cases = json.load(saved)
    for case, variants in cases.items():
        rounds = len(variants["plain"]) // args.steps
        blocks = {v: np.asarray(times[:rounds * args.steps]).reshape(rounds, args.steps)
                  for v, times in variants.items()}
        ratios = bootstrap_ratios(blocks)
        parts = [f"{variant} {interval(r)}" for variant, r in ratios.items()]
        for variant, control in DIFFERENCES:
            if {variant, control} <= ratios.keys():
                difference = ratios[variant] - ratios[control]
                parts.append(f"{variant} - {control} {interval(difference, '+.3f')}")
        print(f"{case} ({rounds} rounds): " + "; ".join(parts))


if __name__ == "__main__":
    main()
