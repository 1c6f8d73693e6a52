"""The init job's data: read the split with Ray Data, draw the exact seeded sample, tokenise it
and split it into one stream per gradient worker.

The sample is the one ``data.sample_table(data.load_split(...), num_samples, seed)`` gives, in
the same order, with a ``_sample_index`` column 0..n-1 so that the driver can check that every
sampled example was counted exactly once."""

from __future__ import annotations

import contextlib
import functools
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..options import InitOptions, column_kwargs
from .cluster import reraise_clean

SAMPLE_INDEX = "_sample_index"  # column carrying each sampled row's position in the sample
TOKENISE_ROWS = 1024  # rows per tokenisation task


@contextlib.contextmanager
def data_context():
    """Ray Data settings for this pipeline: rows in order (the sample depends on it), no Ray Data
    progress bars (ours is the one that counts examples), and our own exceptions out of map
    functions (a missing column is a ValueError naming the columns, not a wrapped "UDF failed").
    Restored afterwards."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    names = ("enable_progress_bars", "print_on_execution_start", "raise_original_map_exception")
    saved = {name: getattr(ctx, name) for name in names}
    saved_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.raise_original_map_exception = True
    try:
        yield ctx
    finally:
        ctx.execution_options.preserve_order = saved_order
        for name, value in saved.items():
            setattr(ctx, name, value)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def is_uri(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


def path_for_tasks(path: Path) -> str:
    """An absolute path, unless the driver runs inside a Ray job's working_dir and the path lies
    in it: then relative, so every node finds it in its own copy of the working_dir."""
    import ray

    in_working_dir = False
    if ray.is_initialized():  # (get_runtime_context() would start a Ray instance otherwise)
        in_working_dir = bool(ray.get_runtime_context().runtime_env.get("working_dir"))
    resolved = path.resolve()
    if in_working_dir and not path.is_absolute():
        try:
            return str(resolved.relative_to(Path.cwd().resolve()))
        except ValueError:
            pass
    return str(resolved)


def read_units(data: str, split: str) -> list[tuple[str, str]]:
    """The pieces of a dataset's split, as ``(source, split)`` pairs in the order ``load_split``
    concatenates them (:func:`loraga_ray.data.split_sources` decides); each piece is read by one
    task. ``split`` is ``""`` for a piece read whole, the split's name for a demo dataset."""
    from ..data import DEMO_DATASETS, split_sources

    if data in DEMO_DATASETS:
        return [(data, split)]
    return [(path_for_tasks(p), "") for p in split_sources(data, split)]


def read_pieces(batch: pa.Table, task: str, columns: dict) -> pa.Table:
    """Ray Data map function: read the pieces named in ``batch`` exactly as ``load_split`` would."""
    from .. import data as D

    tables = []
    for source, split in zip(batch.column("source").to_pylist(), batch.column("split").to_pylist()):
        if split:  # a demo dataset: its own splits and labels
            tables.append(D.load_split(source, split, task=task, **{k: v for k, v in columns.items() if k != "label_names"}))
        else:  # a data file, or a split's subfolder: all of it, with load_split's column handling
            tables.append(D.select_columns(D.read_whole(Path(source)), source, task, **columns))
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def select_block(batch: pa.Table, source: str, task: str, columns: dict) -> pa.Table:
    """Ray Data map function for natively read blocks: canonical columns, as load_split does."""
    from ..data import select_columns

    return select_columns(batch, source, task, **columns)


def read_dataset(opts: InitOptions, task: str):
    """A Ray Dataset of the split's rows, canonical columns, in ``load_split`` order; class-name
    labels mapped to the ids of the training split's sorted names. Returns (dataset, names)."""
    import ray

    columns = column_kwargs(opts)
    if is_uri(opts.data):
        name = opts.data.rstrip("/").lower()
        if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
            ds = ray.data.read_json(opts.data, lines=".jsonl" in name)
        elif name.endswith((".csv", ".csv.gz")):
            ds = ray.data.read_csv(opts.data)
        else:  # a .parquet file or a prefix of parquet files
            ds = ray.data.read_parquet(opts.data)
        names = _uri_label_names(ds, opts.label_column) if task == "seq-cls" else None
        return ds.map_batches(select_block, fn_kwargs=dict(source=opts.data, task=task,
                                                           columns=dict(columns, label_names=names)),
                              batch_format="pyarrow", batch_size=None), names
    names = local_label_names(opts.data, opts.label_column) if task == "seq-cls" else None
    units = read_units(opts.data, opts.split)
    items = ray.data.from_items([{"source": s, "split": p} for s, p in units], override_num_blocks=len(units))
    return items.map_batches(read_pieces, fn_kwargs=dict(task=task, columns=dict(columns, label_names=names)),
                             batch_format="pyarrow", batch_size=1), names


def local_label_names(data: str, label_column: str | None) -> list[str] | None:
    """The class names every split of a local dataset is mapped with (None: class ids, or a
    demo dataset): the training split's, as ``load_split`` takes them."""
    from ..data import DEMO_DATASETS, train_label_names
    from ..data.sources import _class_label_names, _read_split

    if data in DEMO_DATASETS:
        return None
    from ..data import split_sources

    column = label_column or "label"
    sources = split_sources(data, "train")
    if all(p.is_file() and p.suffix == ".parquet" for p in sources):  # the label column alone, not the rows
        import pyarrow.parquet as pq

        schema = pq.read_schema(sources[0])
        if column not in schema.names:
            return None
        names = _class_label_names(schema, column)
        if names:
            return names
        raw = pa.concat_tables([pq.read_table(p, columns=[column]) for p in sources], promote_options="default")
    else:
        raw = _read_split(data, "train")
    return train_label_names(raw, label_column) or _class_label_names(raw.schema, column)


def _uri_label_names(ds, label_column: str | None) -> list[str] | None:
    """Sorted class names of a remote dataset whose label column holds strings (one pass of
    Ray Data over that column), else None."""
    name = label_column or "label"
    schema = ds.schema()
    if schema is None or name not in schema.names:
        return None
    kind = schema.types[schema.names.index(name)]
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_dictionary(kind)):
        return None
    return sorted(str(v) for v in ds.unique(name) if v is not None)


def _kept_train_rows(opts: InitOptions, total: int) -> np.ndarray:
    """Row indices (of the split as read) the sample may use: for a local dataset without a
    validation (or test) split, the training rows ``load_split`` keeps after holding those out."""
    from ..data import DEMO_DATASETS, holdout, missing_splits
    from ..data.sources import _split_of

    if is_uri(opts.data) or opts.data in DEMO_DATASETS or (_split_of(opts.split) or opts.split) != "train":
        return np.arange(total)
    missing = missing_splits(opts.data)
    return holdout(total, missing, opts.data)["train"] if missing else np.arange(total)


def _block_stats(block: pa.Table) -> tuple[int, int]:
    """(rows, largest label or -1) of one block."""
    import pyarrow.compute as pc

    top = -1
    if "label" in block.column_names and block.num_rows:
        top = pc.max(block.column("label")).as_py()
        top = -1 if top is None else int(top)
    return block.num_rows, top


def _take(block: pa.Table, indices: np.ndarray) -> pa.Table:
    return block.take(pa.array(indices))


@functools.lru_cache(maxsize=None)
def _remote(fn):
    import ray

    return ray.remote(num_cpus=0.25)(fn)


def read_sample(opts: InitOptions, task: str) -> tuple[pa.Table, dict]:
    """Read the dataset with Ray Data and draw the sample: ``(sample table, info)``.

    The sample's rows are those of ``data.sample_table(load_split(...), num_samples, seed)`` in
    the same order, plus a ``_sample_index`` column 0..n-1.
    """
    import ray

    from ..data import sample_indices, table_fingerprint

    ds, names = read_dataset(opts, task)
    try:
        refs = ds.to_arrow_refs()
        stats = ray.get([_remote(_block_stats).remote(r) for r in refs])
    except Exception as e:
        reraise_clean(e)
    counts = [n for n, _ in stats]
    total = int(sum(counts))
    if total == 0:
        raise ValueError(f"dataset {opts.data!r} (split {opts.split!r}) has no rows with the needed columns.")
    kept = _kept_train_rows(opts, total)  # rows held out as validation / test are never sampled
    indices, too_small = sample_indices(len(kept), opts.num_samples, opts.seed)
    indices = kept[indices]
    if too_small:
        warnings.warn(
            f"asked for {opts.num_samples} samples but {opts.data} ({opts.split}) has only {len(kept)} rows; "
            f"using all {len(kept)} of them (the artifact's meta records the counts)."
        )
    starts = np.concatenate([[0], np.cumsum(counts)])
    parts = []
    for b, ref in enumerate(refs):
        lo, hi = np.searchsorted(indices, [starts[b], starts[b + 1]])
        if hi > lo:
            parts.append(_remote(_take).remote(ref, indices[lo:hi] - starts[b]))
    tables = ray.get(parts)
    sample = pa.concat_tables(tables, promote_options="default").combine_chunks()
    del refs  # the full blocks can go now
    info = {
        "dataset_rows": len(kept),
        "label_names": names,
        "num_samples_requested": opts.num_samples,
        "sample_too_small": bool(too_small),
        "dataset_fingerprint": table_fingerprint(sample),
        "max_label": max(top for _, top in stats),
        "sample_bytes": int(sample.nbytes),
    }
    sample = sample.append_column(SAMPLE_INDEX, pa.array(np.arange(sample.num_rows, dtype=np.int64)))
    return sample, info


# ---------------------------------------------------------------------------------------------
# Tokenising and streaming
# ---------------------------------------------------------------------------------------------


def _tokenise(table: pa.Table, encoder) -> pa.Table:
    """Ray Data map function: the sample's rows -> input_ids / labels (token lists) + index."""
    batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names if name != SAMPLE_INDEX}
    encoded = encoder(batch)
    ids = pa.array([x.tolist() for x in encoded["input_ids"]], type=pa.list_(pa.int64()))
    if encoder.task == "causal-lm":
        labels = pa.array([x.tolist() for x in encoded["labels"]], type=pa.list_(pa.int64()))
    else:
        labels = pa.array(np.asarray(encoded["labels"], dtype=np.int64))
    return pa.table({"input_ids": ids, "labels": labels, SAMPLE_INDEX: table.column(SAMPLE_INDEX)})


def token_dataset(sample: pa.Table, encoder, batch_size: int):
    """Ray Data pipeline: tokenise the sample on CPU and cut it into blocks of at most one batch."""
    import ray

    chunks = [sample.slice(i, TOKENISE_ROWS) for i in range(0, sample.num_rows, TOKENISE_ROWS)]
    ds = ray.data.from_arrow(chunks)
    ds = ds.map_batches(_tokenise, fn_kwargs=dict(encoder=encoder), batch_format="pyarrow", batch_size=None, num_cpus=0.5)
    return ds.repartition(target_num_rows_per_block=batch_size)


def token_streams(sample: pa.Table, encoder, batch_size: int, workers: int):
    """One stream per worker of the tokenised sample (every row goes to exactly one stream)."""
    return token_dataset(sample, encoder, batch_size).streaming_split(workers, equal=False)


def token_shards(sample: pa.Table, encoder, batch_size: int, workers: int) -> list:
    """One tokenised dataset per worker of the sharded strategy: contiguous shares of the sample
    that differ by at most one row (None for a worker with no row). Fixed shares, not a streaming
    split: the sharded workers step in lockstep, and a split's coordinator could hand the next
    block to a worker that is waiting in a collective for the others. Tokenised here, before the
    workers start stepping: the ranks then begin together, and a slow tokeniser is not mistaken
    for a stuck worker."""
    n = sample.num_rows
    bounds = [n * i // workers for i in range(workers + 1)]
    return [token_dataset(sample.slice(a, b - a), encoder, batch_size).materialize() if b > a else None
            for a, b in zip(bounds, bounds[1:])]
