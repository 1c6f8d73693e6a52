"""Tokenisation and batching. :class:`Encoder` produces ragged per-example arrays, so it can run
inside ``ray.data.Dataset.map_batches``; :func:`collate` pads a batch into tensors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from ..models import ModelSpec, load_tokenizer
from .sources import IGNORE_INDEX, TASKS



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


def group_by_length(encoded: list[dict], size: int) -> list[dict]:
    """Encoded classification batches (:class:`Encoder` output) regrouped, shortest examples
    first, into batches of ``size``. Each batch pads to its longest example, so batches of alike
    lengths pad far less (MiniLM, 256 validation reviews, batches of 16: 38% fewer tokens,
    evaluation 1.6x faster); loss and accuracy are sums over examples, which the grouping does
    not change. For evaluation only: training keeps its seeded order."""
    ids = [x for e in encoded for x in e["input_ids"]]
    labels = np.concatenate([np.asarray(e["labels"], dtype=np.int64) for e in encoded]) if encoded else np.zeros(0, np.int64)
    order = np.argsort([len(x) for x in ids], kind="stable")
    return [{"input_ids": [ids[i] for i in order[k : k + size]], "labels": labels[order[k : k + size]]}
            for k in range(0, len(order), size)]


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

