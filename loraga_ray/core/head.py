"""The optional head-first step (``--head-warmup-steps``): fit a new classifier head alone, every
other weight frozen, on the gradient estimate's sample before anything else uses the model.

For a classifier the gradient reaches the encoder through the new head; a freshly drawn head
points nowhere, so the gradient LoRA-GA factorises is mostly the head's noise. Fitting the head
first (linear probing) makes the gradient go through a head that already separates the classes.
For a comparison to be fair every method gets the same warm-up: the init pipeline warms the head
before its gradient (the artifact carries the result), and a run of any other init warms it in
the same way from the same head and sample before its own init (for plain LoRA this is LP-FT:
linear probing, then fine-tuning). The same inputs give the same head either way.

The warm-up: AdamW (no weight decay) at a constant ``lr`` for ``steps`` steps over the sample's
batches in order, cycling when there are fewer batches than steps; the model in eval mode
(no dropout), so the head fits the features the gradient estimate then sees."""

from __future__ import annotations

import contextlib
from typing import Mapping, Sequence

import torch
from torch import nn


class HeadWarmupError(ValueError):
    """A head warm-up that cannot run as asked."""


def warm_up_head(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], heads: Sequence[str], *,
                 steps: int, lr: float, device: torch.device | str | None = None, on_step=None,
                 batch_size: int | None = None) -> dict:
    """Train the modules ``heads`` of ``model`` alone for ``steps`` AdamW steps on ``batches``
    (collated; cycled in order). Every parameter's ``requires_grad`` and the train / eval mode
    are restored afterwards; ``on_step(k)`` is called after step k. Returns what the run's
    metadata records: steps, lr, the batch size (``batch_size``, the one asked for: the sample
    may be smaller than one batch; default the first batch's) and the first and last step's loss."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise HeadWarmupError(f"--head-warmup-steps must be a positive integer here, got {steps!r}.")
    if not heads:
        raise HeadWarmupError("--head-warmup-steps fits a new classifier head, and this model has none (a causal LM, "
                              "or a model without a sequence-classification head): drop --head-warmup-steps.")
    if not batches:
        raise HeadWarmupError("--head-warmup-steps: the estimate's sample is empty, there is nothing to fit the head on.")
    modules = [model.get_submodule(h) for h in heads]
    head_dtype = next(modules[0].parameters()).dtype
    base_dtype = _lowest_float_dtype(p for n, p in model.named_parameters() if not any(n.startswith(h + ".") for h in heads))
    before = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    # the head trains in float32 whatever the base's dtype (a bfloat16 base runs under autocast),
    # as it does in the fine-tuning itself; it goes back to its dtype afterwards
    autocast = torch.autocast(device.type, dtype=base_dtype) if base_dtype != torch.float32 else contextlib.nullcontext()
    losses = []
    try:
        for m in modules:
            m.float()
        params = [p for m in modules for p in m.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        model.eval()
        for step in range(steps):
            batch = batches[step % len(batches)]
            with autocast:
                loss = model(**{k: v.to(device) for k, v in batch.items()}).loss.float()
            if not torch.isfinite(loss):
                raise HeadWarmupError(f"the head warm-up's loss is {float(loss)} at step {step + 1}: lower "
                                      f"--head-warmup-lr (now {lr:g}).")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step + 1)
    finally:
        for m in modules:
            m.to(head_dtype)
        for p, flag in before:
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return {"steps": steps, "lr": float(lr), "batch_size": int(batch_size or len(batches[0]["labels"])),
            "loss_first": losses[0], "loss_last": losses[-1]}


def _lowest_float_dtype(params) -> torch.dtype:
    """The 16-bit dtype among these parameters (the one autocast must run in), else float32."""
    dtypes = {p.dtype for p in params if p.is_floating_point()}
    return next((d for d in (torch.bfloat16, torch.float16) if d in dtypes), torch.float32)


def check_artifact_warmup(artifact_meta: Mapping, steps: int, lr: float, where: str,
                          batch_size: int | None = None) -> None:
    """A run that starts from an artifact's head must ask for the warm-up that head had (steps,
    lr and, given ``batch_size``, the estimate's batch size): otherwise its LoRA-GA / LoRA-One run
    and a baseline beside it would start from different heads."""
    head = artifact_meta.get("head") or {}
    if not head:
        return
    had = head.get("warmup") or {}
    had_steps, had_lr, had_batch = int(had.get("steps", 0)), float(had.get("lr") or "nan"), had.get("batch_size")
    same = had_steps == steps and (steps == 0 or abs(had_lr - lr) <= 1e-12 * max(1.0, abs(lr)))
    if same and steps and batch_size is not None and had_batch is not None and int(had_batch) != batch_size:
        raise HeadWarmupError(
            f"the artifact {where} carries a head fitted in batches of {had_batch}, but this run's --init-batch-size is "
            f"{batch_size}: a method that fits its own head would fit another one. Pass --init-batch-size {had_batch}.")
    if not same:
        said = f"{had_steps} step(s) at lr {had_lr:g}" if had_steps else "no warm-up"
        asked = f"{steps} step(s) at lr {lr:g}" if steps else "no warm-up"
        flags = f"--head-warmup-steps {had_steps}" + (f" --head-warmup-lr {had_lr:g}" if had_steps else "")
        raise HeadWarmupError(
            f"the artifact {where} carries a classifier head fitted with {said}, but this run asks for {asked}: "
            f"pass {flags} to train from it (every method then starts from the same head), or estimate a new "
            "artifact with the warm-up you want.")
