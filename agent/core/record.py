"""What a front end writes to its device buffer for one step, and how the host reads it.

A record is a float32 vector ``[value (N), nan_count (N), inf_count (N)]`` over the
session's N variables: value is the gradient's L2 norm, or `ABSENT` when the variable
got no gradient; NaN and Inf counts are 0 for a finite gradient. Front ends compute it
on the gradients' device (one read of each gradient); `to_statistics` turns records
into the `gradwatch.proto.layout` columns on the host.
"""

from __future__ import annotations

import numpy as np

from gradwatch.proto.layout import COLUMN, NUM_COLUMNS

RECORD_WIDTH = 3
ABSENT = -1.0


def from_norms(norms: np.ndarray) -> np.ndarray:
    """Records ``[..., RECORD_WIDTH * N]`` of norms ``[..., N]`` alone (`ABSENT` included):
    a NaN count of 1 where a norm is NaN, an Inf count of 1 where it is infinite (what a
    front end that never waits for its device knows)."""
    return np.concatenate([norms, np.isnan(norms), np.isinf(norms)], axis=-1,
                          dtype=np.float32)


def to_statistics(records: np.ndarray, num_variables: int) -> np.ndarray:
    """Records ``[..., RECORD_WIDTH * N]`` as layout statistics ``[..., N, NUM_COLUMNS]``
    (vectorized)."""
    records = records.reshape(*records.shape[:-1], RECORD_WIDTH, num_variables)
    values, nan, inf = records[..., 0, :], records[..., 1, :], records[..., 2, :]
    present = values != ABSENT
    stats = np.zeros((*values.shape, NUM_COLUMNS), np.float32)
    stats[..., COLUMN["present"]] = present
    stats[..., COLUMN["l2_norm"]] = np.where(present, values, 0.0)
    stats[..., COLUMN["nan_count"]] = nan
    stats[..., COLUMN["inf_count"]] = inf
    return stats
