"""``gradwatch demo``: a collector, a broken distributed training run, the alert it raises."""
