"""Reading ``/metrics`` text as tests need it."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name → [(labels, value)], via prometheus_client's own parser."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def select(samples, name: str, **labels: str) -> dict[str, float]:
    """Values of ``name`` whose labels include ``labels``, keyed by the ``variable``
    label (or by all labels when there is none)."""
    out = {}
    for sample_labels, value in samples.get(name, []):
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            key = sample_labels.get("variable") or ",".join(
                f"{k}={v}" for k, v in sorted(sample_labels.items()))
            out[key] = value
    return out
