"""Evaluation: the loss and accuracy (seq-cls) or exact match (causal-lm) of a model on a list
of batches, on each training worker during a run (:func:`evaluate`, the sums all-reduced), and on
the driver after it (:func:`evaluate_split`), where the exported PEFT adapter is loaded onto a
freshly loaded, unmodified base model (:func:`load_finished`, the way a user would load it), so
every reported test figure also checks the adapter round trip."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from .build import set_label_names
from .checkpoints import LABELS_FILE, unwrap_ddp


def load_finished(model: str, run_out: str | Path, *, num_labels: int = 2, seed: int = 0):
    """The trained model of a run folder: ``adapter/`` on the original base, or ``model/`` (full).
    An adapter trained on named classes carries them (labels.json): the base gets that many
    labels and their names."""
    from peft import PeftModel

    from ..models import load_model, resolve_model

    run_out = Path(run_out)
    spec = resolve_model(model)
    if (run_out / "adapter").is_dir():
        from transformers.utils import logging as hf_logging

        quiet = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the base's head is "missing": the adapter carries the trained one
        labels_file = run_out / "adapter" / LABELS_FILE
        names = None
        if labels_file.is_file():
            maps = json.loads(labels_file.read_text())
            names = [maps["id2label"][str(i)] for i in range(len(maps["id2label"]))]
            num_labels = len(names)
        try:
            base = load_model(spec, num_labels=num_labels, seed=seed)
        finally:
            hf_logging.set_verbosity(quiet)
        set_label_names(base, names)
        return PeftModel.from_pretrained(base, str(run_out / "adapter")).eval(), spec
    if (run_out / "model").is_dir():
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        cls = AutoModelForSequenceClassification if spec.task == "seq-cls" else AutoModelForCausalLM
        return cls.from_pretrained(str(run_out / "model")).eval(), spec
    raise FileNotFoundError(f"{run_out} holds neither adapter/ nor model/: the run did not finish.")


def evaluate_split(model, spec, data: str, split: str = "test", *, max_length: int = 128, batch_size: int = 32,
                   limit: int | None = None, seed: int = 0) -> dict:
    """Loss and accuracy (seq-cls) or exact match (causal-lm, greedy) on ``split`` of ``data``."""
    from ..data import Encoder, collate, group_by_length, iter_batches, load_split, sample_table
    from ..models import load_tokenizer

    table = load_split(data, split)
    if spec.task == "seq-cls":
        from ..data import check_labels

        check_labels(table, f"{data} ({split})", int(getattr(getattr(model, "config", None), "num_labels", 0) or 0) or None)
    if limit is not None and table.num_rows > limit:
        table = sample_table(table, limit, seed)
    tok = load_tokenizer(spec)
    enc = Encoder(tok, spec.task, max_length=max_length)
    responses = table.column("response").to_pylist() if "response" in table.column_names else [None] * table.num_rows
    if spec.task == "seq-cls" and table.num_rows:  # batches of alike lengths pad far less; metrics are sums over examples
        whole = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
        batches = [(collate(b, tok.pad_token_id, spec.task), []) for b in group_by_length([enc(whole)], batch_size)]
    else:
        batches = [(b, responses[i * batch_size:(i + 1) * batch_size])
                   for i, b in enumerate(iter_batches(table, enc, batch_size, tok.pad_token_id, spec.task))]
    metrics = evaluate(model, batches, spec.task, torch.device("cpu"), contextlib.nullcontext, tok, 1)
    out = {k.replace("eval_", f"{split}_"): v for k, v in metrics.items()}
    out[f"{split}_examples"] = table.num_rows
    return out


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def exact_matches(module, batch: dict, responses, tokenizer, device, autocast, synced: bool = False) -> int:
    """Greedy generation from each example's prompt (its -100-labelled prefix, i.e. the ids of
    Encoder.encode_prompt) and comparison of the stripped text with the reference response."""
    ids, labels = batch["input_ids"], batch["labels"]
    prompts, answer_lens = [], []
    for i in range(ids.shape[0]):
        supervised = (labels[i] != -100).nonzero()
        start = int(supervised[0]) if len(supervised) else int(batch["attention_mask"][i].sum())
        prompts.append(ids[i, :start])
        answer_lens.append(len(supervised))
    width = max(1, max(len(p) for p in prompts))
    pad = tokenizer.pad_token_id
    x = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, p in enumerate(prompts):  # left padding for generation
        if len(p):
            x[i, width - len(p):] = p
            mask[i, width - len(p):] = 1
    with autocast():
        out = module.generate(input_ids=x.to(device), attention_mask=mask.to(device), max_new_tokens=max(answer_lens) + 1,
                              do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                              **({"synced_gpus": True} if synced else {}))
    texts = tokenizer.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)
    return sum(int(t.strip() == str(r).strip()) for t, r in zip(texts, responses))


def _idle_pass(module, task: str, device, autocast, tokenizer) -> None:
    """What a rank without a batch runs while the others evaluate under FSDP: one forward of a
    one-token batch (each forward gathers every unit's shards from all ranks), and for causal-lm
    one generate, which keeps running until every rank's generation ends (``synced_gpus``)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    x = torch.full((1, 1), pad, dtype=torch.long, device=device)
    with autocast():
        module(input_ids=x, attention_mask=torch.ones_like(x))
        if task != "seq-cls":
            module.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=1, do_sample=False,
                            num_beams=1, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, synced_gpus=True)


def evaluate(model, batches: list, task: str, device, autocast, tokenizer, world: int, on_batch=None,
             lockstep: bool = False) -> dict:
    """Loss over all eval targets (token-weighted for causal-lm), plus accuracy (seq-cls) or exact
    match (causal-lm); every worker evaluates its share, the sums are all-reduced. ``on_batch`` is
    called after each batch (the step watchdog: an evaluation that progresses is not stuck).
    ``lockstep`` (FSDP): every rank runs as many forwards as the rank with the most batches, an
    idle pass where it has none, since each forward is a collective."""
    from ..data import supervised_count

    module = unwrap_ddp(model)
    module.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss sum, loss count, correct, examples
    rounds = len(batches)
    if lockstep and world > 1:
        import torch.distributed as dist

        most = torch.tensor([rounds], dtype=torch.int64, device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        rounds = int(most.item())
    with torch.no_grad():
        for i in range(rounds):
            cpu_batch, responses = batches[i] if i < len(batches) else (None, None)
            n = supervised_count(cpu_batch, task) if cpu_batch is not None else 0
            if n == 0:
                if lockstep:
                    _idle_pass(module, task, device, autocast, tokenizer)
                continue
            batch = to_device(cpu_batch, device)
            with autocast():
                out = module(**batch)
            sums[0] += float(out.loss.float()) * n
            sums[1] += n
            if task == "seq-cls":
                sums[2] += float((out.logits.argmax(-1) == batch["labels"]).sum())
                sums[3] += batch["labels"].numel()
            else:
                sums[2] += exact_matches(module, cpu_batch, responses, tokenizer, device, autocast, synced=lockstep)
                sums[3] += len(responses)
            if on_batch is not None:
                on_batch()
    if world > 1:
        import torch.distributed as dist

        t = sums.to(device)
        dist.all_reduce(t)
        sums = t.cpu()
    loss_sum, count, correct, total = sums.tolist()
    metrics = {"eval_loss": loss_sum / count if count else float("nan")}
    metrics["eval_accuracy" if task == "seq-cls" else "eval_exact_match"] = correct / total if total else float("nan")
    return metrics
