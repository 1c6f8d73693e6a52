"""Datasets as users have them, one split at a time: reading (``sources``; the offline demo
datasets in ``demo``), seeded sampling and fingerprints (``sampling``), and tokenisation and
batching (``encoding``). Nothing here imports ray: it works without a cluster.

The names below are the package's interface; ``from loraga_ray.data import load_split`` works as
it always has."""

from .demo import DEMO_DATA_SPECS, DEMO_DATASETS, DataSpec
from .encoding import Encoder, collate, group_by_length, iter_batches, supervised_count
from .sampling import sample_indices, sample_table, table_fingerprint
from .sources import (
    CANONICAL_COLUMNS,
    IGNORE_INDEX,
    SPLITS,
    TASKS,
    DatasetNotFoundError,
    check_labels,
    holdout,
    infer_task,
    label_names,
    load_split,
    missing_splits,
    num_classes,
    read_whole,
    select_columns,
    split_sources,
    train_label_names,
    with_label_names,
)

__all__ = [
    "CANONICAL_COLUMNS", "DEMO_DATASETS", "DEMO_DATA_SPECS", "IGNORE_INDEX", "SPLITS", "TASKS",
    "DataSpec", "DatasetNotFoundError", "check_labels", "Encoder", "collate", "group_by_length", "holdout", "infer_task", "iter_batches",
    "label_names", "load_split", "missing_splits", "num_classes", "train_label_names", "with_label_names",
    "read_whole", "sample_indices", "sample_table", "select_columns", "split_sources", "supervised_count",
    "table_fingerprint",
]
