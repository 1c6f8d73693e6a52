"""Seeded sampling without replacement, and content fingerprints of tables."""

from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import pyarrow as pa



def sample_indices(num_rows: int, num_samples: int, seed: int) -> tuple[np.ndarray, bool]:
    """Sorted row indices drawn uniformly without replacement, deterministic from ``seed``.

    Returns ``(indices, too_small)``; when the dataset has fewer than ``num_samples`` rows,
    all row indices are returned and ``too_small`` is True (the caller should warn).
    """
    if num_rows <= 0:
        raise ValueError("dataset is empty: there are no rows to sample from")
    if num_samples <= 0:
        raise ValueError(f"number of samples must be positive, got {num_samples}")
    if num_rows < num_samples:
        return np.arange(num_rows, dtype=np.int64), True
    rng = np.random.default_rng(seed)
    indices = rng.choice(num_rows, size=num_samples, replace=False)
    return np.sort(indices).astype(np.int64), False


def sample_table(table: pa.Table, num_samples: int, seed: int) -> pa.Table:
    """The rows of :func:`sample_indices`, warning when the table has too few rows."""
    indices, too_small = sample_indices(table.num_rows, num_samples, seed)
    if too_small:
        warnings.warn(
            f"asked for {num_samples} samples but the dataset has only {table.num_rows} rows; "
            f"using all of them"
        )
    return table.take(pa.array(indices))


def table_fingerprint(table: pa.Table) -> str:
    """SHA-256 (hex) of a table's column names, types and values, in row order.

    It depends on content only, not on chunking or schema metadata, so it is stable across runs
    and across the file format the rows came from (for equal column types).
    """
    digest = hashlib.sha256()
    schema = [[field.name, str(field.type)] for field in table.schema]
    digest.update(json.dumps({"schema": schema, "num_rows": table.num_rows}).encode())
    rows_per_piece = 4096
    for name in table.column_names:
        column = table.column(name)
        for start in range(0, table.num_rows, rows_per_piece):
            values = column.slice(start, rows_per_piece).to_pylist()
            digest.update(json.dumps(values, ensure_ascii=False, default=repr).encode("utf-8"))
    return digest.hexdigest()


