"""User data as users have it: class names mapped to ids (the training split's sorted names, one
mapping for every split), Hugging Face ClassLabel columns with their names, and a dataset with
only a train split given a fixed held-out validation and test split."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loraga_ray.data import holdout, label_names, load_split, missing_splits, num_classes, sample_table
from loraga_ray.data.sources import HOLDOUT_SEED


def _named(tmp_path, **splits):
    folder = tmp_path / "named"
    folder.mkdir()
    for split, labels in splits.items():
        pq.write_table(pa.table({"text": [f"{split} {i}" for i in range(len(labels))], "label": labels}),
                       folder / f"{split}.parquet")
    return str(folder)


def test_class_names_become_sorted_ids_with_one_mapping_for_every_split(tmp_path):
    data = _named(tmp_path, train=["tech", "sports", "world", "sports", "tech"],
                  validation=["world", "tech"], test=["sports", None])
    train = load_split(data, "train")
    assert label_names(train) == ["sports", "tech", "world"]
    assert train["label"].to_pylist() == [1, 0, 2, 0, 1]
    assert num_classes(train) == 3
    val = load_split(data, "validation")
    assert val["label"].to_pylist() == [2, 1] and label_names(val) == ["sports", "tech", "world"]
    with pytest.warns(UserWarning, match="dropped 1 of 2 rows"):
        test = load_split(data, "test")
    assert test["label"].to_pylist() == [0]
    # sampling and slicing keep the names
    assert label_names(sample_table(train, 3, seed=1)) == ["sports", "tech", "world"]


def test_unseen_class_name_is_a_clear_error(tmp_path):
    data = _named(tmp_path, train=["a", "b"], validation=["b", "c"])
    with pytest.raises(ValueError, match=r"\(validation\): row 1 has label 'c', a class the training split does not "
                                         r"have \(its 2 classes: 'a', 'b'\)"):
        load_split(data, "validation")


def test_class_label_column_keeps_its_ids_and_names(tmp_path):
    """datasets writes a ClassLabel's names into the files' schema metadata (key 'huggingface')."""
    features = {"text": {"dtype": "string", "_type": "Value"},
                "label": {"names": ["neg", "pos", "neutral"], "_type": "ClassLabel"}}
    table = pa.table({"text": ["x", "y", "z"], "label": [2, 0, 1]})
    table = table.replace_schema_metadata({b"huggingface": json.dumps({"info": {"features": features}})})
    folder = tmp_path / "hf"
    folder.mkdir()
    pq.write_table(table, folder / "train.parquet")
    pq.write_table(table.slice(0, 2), folder / "validation.parquet")
    train = load_split(str(folder), "train")
    assert train["label"].to_pylist() == [2, 0, 1] and label_names(train) == ["neg", "pos", "neutral"]
    assert num_classes(train) == 3 and label_names(load_split(str(folder), "validation")) == ["neg", "pos", "neutral"]


def test_saved_dataset_class_label_from_its_dataset_info(tmp_path):
    folder = tmp_path / "saved"
    folder.mkdir()
    table = pa.table({"text": ["a", "b", "c"], "label": [1, 0, 1]})
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {
        "text": {"dtype": "string", "_type": "Value"}, "label": {"names": ["bad", "good"], "_type": "ClassLabel"}}}))
    assert label_names(load_split(str(folder), hold_out=False)) == ["bad", "good"]


def test_integer_labels_have_no_names(tmp_path):
    data = _named(tmp_path, train=[0, 1, 1], validation=[1])
    assert label_names(load_split(data)) is None and num_classes(load_split(data)) == 2


def test_train_only_data_gets_fixed_disjoint_validation_and_test(tmp_path, caplog):
    path = tmp_path / "only.jsonl"
    rows = [{"text": f"row {i}", "label": ["x", "y"][i % 2]} for i in range(50)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert missing_splits(str(path)) == ["validation", "test"]
    with caplog.at_level(logging.WARNING):
        parts = {s: load_split(str(path), s) for s in ("train", "validation", "test")}
    assert "holding out 5 for validation and 5 for test of its 50 training rows" in caplog.text
    texts = {s: set(t["text"].to_pylist()) for s, t in parts.items()}
    assert [len(texts[s]) for s in ("train", "validation", "test")] == [40, 5, 5]
    assert not (texts["train"] & texts["validation"]) and not (texts["train"] & texts["test"])
    assert not (texts["validation"] & texts["test"])
    assert texts["train"] | texts["validation"] | texts["test"] == {r["text"] for r in rows}
    perm = np.random.default_rng(HOLDOUT_SEED).permutation(50)  # the documented rule, written out
    assert texts["validation"] == {f"row {i}" for i in perm[:5]}
    assert all(label_names(t) == ["x", "y"] for t in parts.values())
    # the same rows whatever the seed a caller passes
    assert load_split(str(path), "validation", seed=7)["text"].to_pylist() == parts["validation"]["text"].to_pylist()


def test_data_with_test_but_no_validation_holds_out_validation_only(tmp_path):
    data = _named(tmp_path, train=[0, 1] * 10, test=[0, 1])
    assert missing_splits(data) == ["validation"]
    assert load_split(data, "validation").num_rows == 2 and load_split(data, "train").num_rows == 18
    assert load_split(data, "test").num_rows == 2  # its own test split, untouched
    with pytest.raises(ValueError, match="too few to hold some out"):
        holdout(1, ["validation"], "tiny")


def test_held_out_parts_count_the_classes_of_all_training_rows(tmp_path):
    """A rare class id that lands only in the held-out rows still counts: train, validation and
    test agree on the number of classes (as the init pipeline, which sees every row, does)."""
    path = tmp_path / "rare.jsonl"
    rows = [{"text": f"r{i}", "label": 0 if i % 2 else 1} for i in range(40)]
    perm = np.random.default_rng(HOLDOUT_SEED).permutation(40)
    rows[int(perm[0])]["label"] = 4  # first validation row under the fixed hold-out
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parts = {s: load_split(str(path), s) for s in ("train", "validation", "test")}
    assert 4 not in parts["train"]["label"].to_pylist() and 4 in parts["validation"]["label"].to_pylist()
    assert {s: num_classes(t) for s, t in parts.items()} == {"train": 5, "validation": 5, "test": 5}
    assert num_classes(sample_table(parts["train"], 8, seed=0)) == 5
