"""Reading one split of a dataset: a demo dataset or local files and folders (parquet, json lines
/ json, csv, or a Hugging Face ``save_to_disk`` folder), with the task's canonical columns.

Two tasks are supported, each with canonical column names:

* ``seq-cls``: ``text`` (str) and ``label`` (int64 class id). Labels may be given as class ids,
  as class names (strings: the training split's sorted names become ids 0..n-1, and every split
  is mapped with that one table), or as a Hugging Face ``ClassLabel`` column (its ids, named by
  its names). The names travel in the table's schema metadata (:func:`label_names`);
* ``causal-lm``: ``prompt`` (str) and ``response`` (str); the loss covers the response only.

:func:`split_sources` is the one place that decides which files make up a split; both
:func:`load_split` (one process) and the Ray init pipeline (one read task per file) use it.
A local dataset with only a train split gets a validation and a test split held out of it (one
without validation, a validation split): HOLDOUT_FRACTION of the rows each, chosen with the fixed
HOLDOUT_SEED, so every run, every seed and the init sample see the same disjoint parts
(:func:`holdout`). This module never
imports ray.
"""

from __future__ import annotations

import functools
import json
import logging
import warnings
from pathlib import Path

import numpy as np

import pyarrow as pa
import pyarrow.compute as pc

IGNORE_INDEX = -100  # label value that the loss skips (the Hugging Face convention)
TASKS = ("seq-cls", "causal-lm")
SPLITS = ("train", "validation", "test")
CANONICAL_COLUMNS = {"seq-cls": ("text", "label"), "causal-lm": ("prompt", "response")}
HOLDOUT_FRACTION = 0.1  # of the training rows, for each missing validation / test split
HOLDOUT_SEED = 0  # fixed: the held-out rows do not depend on a run's --seed
LABEL_NAMES_KEY = b"loraga.label_names"  # schema metadata: JSON list, class id -> name
CLASS_COUNT_KEY = b"loraga.num_classes"  # schema metadata of a held-out part: the whole training split's classes

log = logging.getLogger(__name__)
_announced: set = set()


class DatasetNotFoundError(ValueError):
    """A dataset name or path that cannot be found locally (or a missing demo package)."""



_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")
_SPLIT_ALIASES = {
    "train": ("train",),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test",),
}


def _data_format(path: Path) -> str | None:
    """'parquet', 'json' or 'csv' from a file name (json/csv may be compressed), else None."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    return _FORMATS.get(suffixes[-1]) if suffixes else None


def _read_json(path: Path) -> pa.Table:
    """JSON lines, or a JSON array of records."""
    import pyarrow.json

    with pa.input_stream(str(path), compression="detect") as stream:
        head = stream.read(4096).lstrip()
    if head.startswith(b"["):
        with pa.input_stream(str(path), compression="detect") as stream:
            records = json.loads(stream.read().decode("utf-8"))
        return pa.Table.from_pylist(records)
    return pyarrow.json.read_json(str(path))


def _read_file(path: Path) -> pa.Table:
    fmt = _data_format(path)
    if fmt == "parquet":
        import pyarrow.parquet

        return pyarrow.parquet.read_table(path)
    if fmt == "json":
        return _read_json(path)
    if fmt == "csv":
        import pyarrow.csv

        return pyarrow.csv.read_csv(
            path, parse_options=pyarrow.csv.ParseOptions(newlines_in_values=True)
        )
    raise ValueError(
        f"cannot read {path}: unknown file type; use .parquet, .jsonl, .json or .csv, "
        f"or a folder saved with datasets' save_to_disk"
    )


def _concat(tables: list[pa.Table], where: Path) -> pa.Table:
    if len(tables) == 1:
        return tables[0]
    try:
        return pa.concat_tables(tables, promote_options="default")
    except pa.ArrowInvalid as err:
        raise ValueError(f"the data files of {where} do not share one schema: {err}") from err


def _read_saved_dataset(folder: Path) -> pa.Table:
    """A Hugging Face ``Dataset.save_to_disk`` folder, read with pyarrow alone.

    save_to_disk writes the (already index-flattened) rows as Arrow IPC stream files listed
    in state.json, so reading those files gives exactly the saved dataset.
    """
    state = json.loads((folder / "state.json").read_text())
    files = [folder / f["filename"] for f in state.get("_data_files", [])]
    if not files:
        files = sorted(folder.glob("*.arrow"))
    if not files:
        raise ValueError(f"{folder} looks like a saved Hugging Face dataset but has no .arrow files")
    tables = []
    for file in files:
        with pa.memory_map(str(file)) as source:
            try:
                tables.append(pa.ipc.open_stream(source).read_all())
            except pa.ArrowInvalid:
                source.seek(0)
                tables.append(pa.ipc.open_file(source).read_all())
    table = _concat(tables, folder)
    info_file = folder / "dataset_info.json"
    if b"huggingface" not in (table.schema.metadata or {}) and info_file.is_file():
        try:  # the features (a ClassLabel's names) are in dataset_info.json too
            features = json.loads(info_file.read_text()).get("features")
        except ValueError:
            features = None
        if isinstance(features, dict):
            table = table.replace_schema_metadata({b"huggingface": json.dumps({"info": {"features": features}})})
    return table


def _split_of(name: str) -> str | None:
    """The split a file or folder name belongs to: 'train', 'train-00000-of-00002', 'dev' ..."""
    stem = name.lower().split(".")[0]
    for split, aliases in _SPLIT_ALIASES.items():
        for alias in aliases:
            if stem == alias or stem.startswith((alias + "-", alias + "_")):
                return split
    return None


def read_whole(path: Path) -> pa.Table:
    """Everything in a file or folder (data files, or a saved Dataset), as one table."""
    if path.is_file():
        return _read_file(path)
    if (path / "state.json").is_file():
        return _read_saved_dataset(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and _data_format(p))
    if not files:
        raise ValueError(
            f"{path} holds no data files (.parquet, .jsonl, .json, .csv) and is not a folder "
            f"saved with datasets' save_to_disk"
        )
    return _concat([_read_file(f) for f in files], path)


def _local_path(name: str) -> Path:
    path = Path(name).expanduser()
    if not path.exists():
        from .demo import DEMO_DATASETS

        raise DatasetNotFoundError(
            f"dataset {name!r} is neither a demo dataset ({', '.join(DEMO_DATASETS)}) nor an "
            f"existing local file or folder. Dataset hubs are not used: pass a local .parquet, "
            f".jsonl, .json or .csv file, or a folder of them, or a save_to_disk folder"
        )
    return path


def split_sources(name_or_path: str | Path, split: str = "train") -> list[Path]:
    """The files and folders whose rows, read whole with :func:`read_whole` and concatenated in
    this order, are ``split`` of the local dataset at ``name_or_path``; a clear error when the
    layout has no such split. See :func:`load_split` for the layouts."""
    path = _local_path(str(name_or_path))
    canonical = _split_of(split) or split
    only_train = (
        f"so it is the 'train' split only; for a {split!r} split pass a folder with one file "
        f"(or subfolder) per split, e.g. train.jsonl and {canonical}.jsonl"
    )
    if path.is_file():
        if canonical != "train":
            raise ValueError(f"{path} is a single file, {only_train}")
        return [path]
    if (path / "dataset_dict.json").is_file():  # datasets' DatasetDict.save_to_disk
        names = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        matches = [n for n in names if (_split_of(n) or n) == canonical]
        if not matches:
            raise ValueError(f"{path} has no {split!r} split; its splits are: {', '.join(names)}")
        return [path / matches[0]]
    if (path / "state.json").is_file():  # a single saved Dataset
        if canonical != "train":
            raise ValueError(f"{path} is one saved Hugging Face Dataset, {only_train}")
        return [path]

    # Files and subfolders named after splits: train.jsonl, test-00000-of-00002.parquet, dev/ ...
    entries = [p for p in sorted(path.iterdir()) if p.is_dir() or _data_format(p)]
    by_split: dict[str, list[Path]] = {}
    for entry in entries:
        stem = entry.name.split(".")[0]
        entry_split = _split_of(entry.name) or (stem if stem == canonical or entry.is_dir() else None)
        if entry_split is not None:
            by_split.setdefault(entry_split, []).append(entry)
    if canonical in by_split:
        return by_split[canonical]
    files = [p for p in entries if p.is_file()]
    if files and not any(s in SPLITS for s in by_split):
        # No file is named after a split: all files together are the train split.
        if canonical != "train":
            raise ValueError(f"{path} has no files named after a split, {only_train}")
        return files
    found = ", ".join(sorted(by_split)) or "none"
    raise ValueError(f"{path} has no {split!r} split; splits found: {found}")


# --------------------------------------------------------------------------------------------
# Column selection
# --------------------------------------------------------------------------------------------


def _infer_task(names: list[str], given: dict[str, str | None], source: str) -> str:
    if given["prompt"] or given["response"]:
        return "causal-lm"
    if given["text"] or given["label"]:
        return "seq-cls"
    for task, columns in CANONICAL_COLUMNS.items():
        if set(columns) <= set(names):
            return task
    raise ValueError(
        f"cannot tell the task of {source}: it has neither text/label nor prompt/response "
        f"columns (its columns are: {', '.join(names)}). Pass task='seq-cls' with "
        f"text_column/label_column, or task='causal-lm' with prompt_column/response_column "
        f"(--task and --text-column etc. on the command line)"
    )


def select_columns(table: pa.Table, source: str, task: str | None = None, *, text_column: str | None = None,
                   label_column: str | None = None, prompt_column: str | None = None,
                   response_column: str | None = None, label_names: list[str] | None = None) -> pa.Table:
    """The task's canonical columns of ``table`` (renamed from ``*_column`` when given), typed
    and checked; rows with null values in them are dropped with a warning. ``source`` names the
    data in error messages. Class-name labels are mapped with ``label_names`` (the training
    split's, from :func:`train_label_names`; a name not in it is an error); a ClassLabel column
    keeps its ids and its names. The result's :func:`label_names` are those names, if any."""
    given = {"text": text_column, "label": label_column, "prompt": prompt_column, "response": response_column}
    names = table.column_names
    task = task or _infer_task(names, given, source)
    wanted = {role: given[role] or role for role in CANONICAL_COLUMNS[task]}
    for role, column in wanted.items():
        if column not in names:
            raise ValueError(
                f"{source} has no column {column!r} (needed as the {role} column for {task}); "
                f"its columns are: {', '.join(names)}. Pass the right name with "
                f"{role}_column=... (--{role}-column on the command line)"
            )
    class_label = _class_label_names(table.schema, wanted["label"]) if "label" in wanted else None
    table = table.select(list(wanted.values())).rename_columns(list(wanted))
    table = table.replace_schema_metadata(None)

    columns, names_out = [], None
    for role in wanted:
        column = table.column(role)
        if role == "label":
            column, names_out = _label_ids(column, wanted[role], source, label_names, class_label)
        elif not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            if not pa.types.is_null(column.type):
                raise ValueError(
                    f"the {role} column {wanted[role]!r} of {source} holds {column.type}, not text"
                )
            column = column.cast(pa.string())
        columns.append(column)
    table = pa.Table.from_arrays(columns, names=list(wanted))
    if "label" in wanted:
        check_labels(table, source, len(names_out) if names_out else None)

    # rows without a value, or (text, response) with only white space: nothing to learn from, and
    # a batch of only such rows would average the loss over zero targets (NaN)
    keep = None
    for role in wanted:
        column = table.column(role)
        valid = pc.is_valid(column)
        if role in ("text", "response"):
            valid = pc.and_(valid, pc.invert(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(column), ""), True)))
        keep = valid if keep is None else pc.and_(keep, valid)
    dropped = table.num_rows - pc.sum(keep).as_py() if table.num_rows else 0
    if dropped:
        what = "null values" + (" or empty text" if "text" in wanted else " or an empty response")
        warnings.warn(f"{source}: dropped {dropped} of {table.num_rows} rows with {what}")
        table = table.filter(keep)
    return with_label_names(table, names_out)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _label_ids(column, name: str, source: str, label_names, class_label):
    """(int64 ids, names or None) of a label column: ids as they are, names mapped, ClassLabel
    ids with their names."""
    if pa.types.is_dictionary(column.type):
        column = pc.cast(column, pa.string())  # a categorical column (e.g. from pandas)
    if _is_text(column.type):
        if not label_names:
            raise ValueError(f"the label column {name!r} of {source} holds class names, but the training split "
                             "gives class ids (or there is no training split to take the names from; the ids are its "
                             "sorted names). Give every split its labels the same way.")
        ids = pc.index_in(column, value_set=pa.array(label_names, pa.string()))
        unseen = pc.and_(pc.is_valid(column), pc.is_null(ids))
        if pc.any(unseen).as_py():
            row = int(pc.index(unseen, True).as_py())
            shown = ", ".join(repr(n) for n in label_names[:20]) + (", ..." if len(label_names) > 20 else "")
            raise ValueError(
                f"{source}: row {row} has label {column[row].as_py()!r}, a class the training split does not have "
                f"(its {len(label_names)} classes: {shown}). Fix or drop that row, or add the class to the training "
                "data."
            )
        return pc.cast(ids, pa.int64()), list(label_names)
    if not (pa.types.is_integer(column.type) or pa.types.is_boolean(column.type)
            or pa.types.is_floating(column.type) or pa.types.is_null(column.type)):
        raise ValueError(
            f"the label column {name!r} of {source} holds {column.type}; labels must be class ids "
            "0..num_labels-1 or class names (strings)"
        )
    try:
        column = pc.cast(column, pa.int64())
    except pa.ArrowInvalid as err:
        raise ValueError(
            f"the label column {name!r} of {source} has non-integer values; labels must be class ids "
            "0..num_labels-1 or class names (strings)"
        ) from err
    return column, (list(class_label) if class_label else None)


def _class_label_names(schema: pa.Schema, column: str) -> list[str] | None:
    """The names of a Hugging Face ``ClassLabel`` column, from the schema metadata ``datasets``
    writes into its parquet and arrow files."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        info = json.loads(raw)
        features = info.get("info", {}).get("features", {})
    except (ValueError, AttributeError):
        return None
    feature = features.get(column) if isinstance(features, dict) else None
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and feature.get("names"):
        return [str(n) for n in feature["names"]]
    return None


def with_label_names(table: pa.Table, names: list[str] | None) -> pa.Table:
    """``table`` with its class names (id -> name) in the schema metadata (or none)."""
    if not names:
        return table.replace_schema_metadata(None)
    return table.replace_schema_metadata({LABEL_NAMES_KEY: json.dumps(list(names))})


def label_names(table: pa.Table) -> list[str] | None:
    """The class names of a table :func:`load_split` returned (class id i is names[i]), or None
    when the data gave class ids only."""
    raw = (table.schema.metadata or {}).get(LABEL_NAMES_KEY)
    return json.loads(raw) if raw else None


def num_classes(table: pa.Table) -> int:
    """Classes of a seq-cls training table: its names, else the largest id + 1 (at least 2)."""
    names = label_names(table)
    if names:
        return max(2, len(names))
    count = (table.schema.metadata or {}).get(CLASS_COUNT_KEY)
    if count:
        return int(count)
    hi = pc.max(table["label"]).as_py() if table.num_rows else None
    if hi is None:
        raise ValueError("the training split has no rows.")
    return max(2, int(hi) + 1)


def train_label_names(raw: pa.Table, label_column: str | None = None) -> list[str] | None:
    """The sorted class names of a raw training table whose label column holds strings (None
    otherwise): the one mapping every split of the dataset is read with."""
    name = label_column or "label"
    if name not in raw.column_names:
        return None
    column = raw.column(name)
    if pa.types.is_dictionary(column.type):
        column = pc.cast(column, pa.string())
    if not _is_text(column.type):
        return None
    return sorted(str(v) for v in pc.unique(column.drop_null()).to_pylist())


def check_labels(table: pa.Table, source: str, num_labels: int | None = None) -> None:
    """Raise ValueError naming the split (``source``) and the first row whose class id is
    negative or, with ``num_labels``, not below it. The one label check of every split."""
    labels = table.column("label")
    bad = pc.less(labels, 0)
    if num_labels is not None:
        bad = pc.or_(bad, pc.greater_equal(labels, num_labels))
    bad = pc.fill_null(bad, False)
    if not pc.any(bad).as_py():
        return
    row = int(pc.index(bad, True).as_py())
    value = labels[row].as_py()
    span = f"0..{num_labels - 1}" if num_labels is not None else "0..num_labels-1"
    raise ValueError(
        f"{source}: row {row} has label {value}, but labels must be class ids {span}"
        + (" (the training split's classes)" if num_labels is not None else "")
        + ". Fix or drop that row, or map the labels to ids first."
    )


def load_split(
    name_or_path: str,
    split: str = "train",
    *,
    seed: int = 0,
    text_column: str | None = None,
    label_column: str | None = None,
    prompt_column: str | None = None,
    response_column: str | None = None,
    task: str | None = None,
    hold_out: bool = True,
) -> pa.Table:
    """Load one split of a dataset as a table with the task's canonical columns.

    ``name_or_path`` is a demo name (:data:`DEMO_DATASETS`) or a local path:

    * a ``.parquet``, ``.jsonl``/``.json`` or ``.csv`` file: it is the "train" split;
    * a folder with files or subfolders named after splits (``train.jsonl``,
      ``validation.parquet``, ``test-00000-of-00002.parquet``, ``dev.csv``, ``train/`` ...);
    * a folder of data files none of which is named after a split: together the "train" split;
    * a folder written by datasets' ``Dataset.save_to_disk`` (train only) or
      ``DatasetDict.save_to_disk`` (one split per subfolder).

    The result has columns ``text``, ``label`` (int64) for seq-cls, or ``prompt``, ``response``
    for causal-lm, renamed from ``*_column`` when given. The task is ``task`` if given, else
    implied by the column options or by which canonical columns the data has. Rows with null
    values in those columns are dropped with a warning. Class-name labels become the ids of the
    training split's sorted names (a ClassLabel column keeps its ids); :func:`label_names` of the
    result gives the names.

    A dataset with only a train split gets validation and test held out of it, one without a
    validation split a validation split (:func:`holdout`: 10% of the training rows each, fixed
    seed); its "train" is then the rest. ``hold_out=False``: the split exactly as the files give
    it (a missing split is an error).

    ``seed`` is accepted for interface stability and unused: demo splits are fixed, file splits
    come from the files, and held-out splits from HOLDOUT_SEED, whatever the run's seed.
    """
    del seed
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    columns = dict(text_column=text_column, label_column=label_column, prompt_column=prompt_column,
                   response_column=response_column)
    name = str(name_or_path)
    from .demo import DEMO_DATA_SPECS, load_demo

    if name in DEMO_DATA_SPECS:
        demo_task = DEMO_DATA_SPECS[name].task
        if task is not None and task != demo_task:
            raise ValueError(f"{name} is a {demo_task} dataset, not {task}")
        return select_columns(load_demo(name, split), f"{name} ({split})", demo_task, **columns)
    where = Path(name).expanduser()
    canonical = _split_of(split) or split
    try:  # the class names, and the rows a missing split comes from
        raw_train = _read_split(name, "train")
    except DatasetNotFoundError:
        raise
    except ValueError:
        if canonical == "train":
            raise
        raw_train = None  # a folder of evaluation splits only: read as they are
    names = train_label_names(raw_train, label_column) if task != "causal-lm" and raw_train is not None else None
    missing = missing_splits(name) if hold_out and raw_train is not None else []
    if missing and canonical in missing + ["train"]:
        train = select_columns(raw_train, f"{where} (train)", task, **columns, label_names=names)
        parts = holdout(train.num_rows, missing, str(where))
        key = (str(where), tuple(missing))
        if key not in _announced:
            _announced.add(key)
            log.warning("%s has no %s split: holding out %s of its %d training rows (%.0f%% each, rows chosen with "
                        "the fixed seed %d, the same for every run)", where, " or ".join(missing),
                        " and ".join(f"{len(parts[m])} for {m}" for m in missing), train.num_rows,
                        100 * HOLDOUT_FRACTION, HOLDOUT_SEED)
        part = train.take(pa.array(parts[canonical]))
        if "label" in train.column_names and not label_names(train) and train.num_rows:
            # class ids: the classes are those of all the training rows, not of this part's
            part = part.replace_schema_metadata({CLASS_COUNT_KEY: str(num_classes(train)).encode()})
        return part
    raw = raw_train if canonical == "train" else _read_split(name, split)
    return select_columns(raw, f"{where} ({split})", task, **columns, label_names=names)


def missing_splits(name_or_path: str | Path) -> list[str]:
    """The splits of a local dataset that are held out of its training rows: ``validation`` when
    it has none, and ``test`` too when it has only a train split. [] for a demo dataset."""
    from .demo import DEMO_DATA_SPECS

    if str(name_or_path) in DEMO_DATA_SPECS:
        return []
    absent = []
    for split in ("validation", "test"):
        try:
            split_sources(name_or_path, split)
        except DatasetNotFoundError:
            raise
        except ValueError:
            absent.append(split)
    if "validation" not in absent:
        return []
    return absent  # ["validation"] (it has a test split) or ["validation", "test"] (train only)


def holdout(num_rows: int, missing: list[str], source: str = "the dataset") -> dict[str, np.ndarray]:
    """Sorted row indices of each missing split (HOLDOUT_FRACTION of the training rows each,
    at least one, chosen with HOLDOUT_SEED) and of the training rows left: disjoint, and the same
    whatever the run."""
    perm = np.random.default_rng(HOLDOUT_SEED).permutation(num_rows)
    per = max(1, int(num_rows * HOLDOUT_FRACTION))
    out, at = {}, 0
    for split in ("validation", "test"):
        if split in missing:
            out[split] = np.sort(perm[at:at + per])
            at += per
    if num_rows - at < 1:
        raise ValueError(f"{source} has no {' or '.join(missing)} split and only {num_rows} training rows: too few to "
                         "hold some out. Add rows, or give the splits as files (validation.jsonl, test.jsonl).")
    out["train"] = np.sort(perm[at:])
    return out


def _signature(paths: list[Path]) -> tuple:
    files = []
    for p in paths:
        for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())):
            st = f.stat()
            files.append((str(f), st.st_mtime_ns, st.st_size))
    return tuple(files)


@functools.lru_cache(maxsize=4)
def _read_cached(name: str, split: str, signature: tuple) -> pa.Table:
    del signature  # part of the key only: a changed file is read again
    return _concat([read_whole(p) for p in split_sources(name, split)], _local_path(name))


def _read_split(name: str, split: str) -> pa.Table:
    """The raw rows of a local dataset's split (cached while its files are unchanged: every split
    reads the training split for its class names)."""
    return _read_cached(name, split, _signature(split_sources(name, split)))


def infer_task(table: pa.Table) -> str:
    """The task of a table returned by :func:`load_split`, from its columns."""
    for task, columns in CANONICAL_COLUMNS.items():
        if list(columns) == table.column_names:
            return task
    raise ValueError(f"a table with columns {table.column_names} is not one load_split returns")


