"""Held-out evaluation of a finished run, on the driver: the exported PEFT adapter is loaded onto a
freshly loaded, unmodified base model (the way a user would load it), so every reported test
figure also checks the adapter round trip."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


def load_finished(model: str, run_out: str | Path, *, num_labels: int = 2, seed: int = 0):
    """The trained model of a run folder: ``adapter/`` on the original base, or ``model/`` (full)."""
    from peft import PeftModel

    from .models import load_model, resolve_model

    run_out = Path(run_out)
    spec = resolve_model(model)
    if (run_out / "adapter").is_dir():
        from transformers.utils import logging as hf_logging

        quiet = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the base's head is "missing": the adapter carries the trained one
        try:
            base = load_model(spec, num_labels=num_labels, seed=seed)
        finally:
            hf_logging.set_verbosity(quiet)
        return PeftModel.from_pretrained(base, str(run_out / "adapter")).eval(), spec
    if (run_out / "model").is_dir():
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        cls = AutoModelForSequenceClassification if spec.task == "seq-cls" else AutoModelForCausalLM
        return cls.from_pretrained(str(run_out / "model")).eval(), spec
    raise FileNotFoundError(f"{run_out} holds neither adapter/ nor model/: the run did not finish.")


def evaluate_split(model, spec, data: str, split: str = "test", *, max_length: int = 128, batch_size: int = 32,
                   limit: int | None = None, seed: int = 0) -> dict:
    """Loss and accuracy (seq-cls) or exact match (causal-lm, greedy) on ``split`` of ``data``."""
    from .data import Encoder, iter_batches, load_split, sample_table
    from .models import load_tokenizer
    from .train import evaluate

    table = load_split(data, split)
    if limit is not None and table.num_rows > limit:
        table = sample_table(table, limit, seed)
    tok = load_tokenizer(spec)
    enc = Encoder(tok, spec.task, max_length=max_length)
    responses = table.column("response").to_pylist() if "response" in table.column_names else [None] * table.num_rows
    batches = [(b, responses[i * batch_size:(i + 1) * batch_size])
               for i, b in enumerate(iter_batches(table, enc, batch_size, tok.pad_token_id, spec.task))]
    metrics = evaluate(model, batches, spec.task, torch.device("cpu"), contextlib.nullcontext, tok, 1)
    out = {k.replace("eval_", f"{split}_"): v for k, v in metrics.items()}
    out[f"{split}_examples"] = table.num_rows
    return out


def steps_to_reach(history, target: float, window: int = 10) -> int | None:
    """First step at which the moving average (``window`` steps) of the training loss is at or
    below ``target``; None if it never gets there."""
    losses = [(h["step"], h["train_loss"]) for h in history if h.get("train_loss") is not None]
    for i in range(len(losses)):
        lo = max(0, i - window + 1)
        avg = sum(v for _, v in losses[lo : i + 1]) / (i + 1 - lo)
        if i + 1 >= min(window, len(losses)) and avg <= target:
            return losses[i][0]
    return None


def moving_mean(values, window: int = 10) -> list[float]:
    """Trailing mean over up to ``window`` values."""
    return [sum(values[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def final_train_loss(history, window: int = 10) -> float:
    """Moving average of the last ``window`` training losses."""
    losses = [h["train_loss"] for h in history if h.get("train_loss") is not None]
    tail = losses[-window:]
    return sum(tail) / len(tail)
