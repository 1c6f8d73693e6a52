"""Full-weight gradient estimate of the target layers.

G is the gradient of the *mean loss over every supervised target of the whole sample*. Each
batch contributes the gradient of its summed loss (the model's mean loss times the batch's
number of supervised targets); the sums are divided by the total count once at the end. The
result is therefore independent of how the sample is cut into batches or spread over workers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from .targets import check_not_quantised, is_transposed


class GradientError(ValueError):
    """The gradient estimate cannot be used (no supervised targets, NaN/Inf, ...)."""


def _is_causal_lm(model: nn.Module) -> bool:
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def supervised_targets(batch: Mapping[str, torch.Tensor], model: nn.Module) -> int:
    """How many loss terms the model's mean loss averages over for this batch.

    Causal LMs shift labels by one inside the model, so the first position never counts;
    every other model counts labels that are not -100 (one per example for classification).
    Float labels (regression, multi-label) count one term per element.
    """
    labels = batch.get("labels")
    if labels is None:
        raise GradientError(
            "a batch has no 'labels': every batch must carry labels so the model returns a loss "
            "(token ids with -100 on unsupervised positions for LMs, class ids for classifiers)."
        )
    if not labels.dtype.is_floating_point:
        if _is_causal_lm(model) and labels.dim() >= 2:
            return int((labels[..., 1:] != -100).sum())
        return int((labels != -100).sum())
    return int(labels.numel())


@dataclass
class GradientSums:
    """Per-layer float32 gradient sums (d_out x d_in) and the counts they are summed over."""

    sums: dict[str, torch.Tensor]
    num_examples: int = 0
    num_targets: int = 0
    num_batches: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


class GradientAccumulator:
    """Accumulates d(summed loss)/dW for the target weights of ``model``, batch by batch.

    Only the target weights require gradients while it is open, so no other gradient is ever
    materialised. Float32 weights accumulate in their own ``.grad`` (no extra memory, no hook);
    lower-precision weights are added into a float32 buffer by a post-accumulate hook as soon as
    their gradient exists, and the low-precision gradient is dropped. The model runs in eval mode
    (no dropout) so the estimate is deterministic. ``close()`` restores every flag it changed.
    """

    def __init__(self, model: nn.Module, target_names: Sequence[str]):
        check_not_quantised(model)
        self.model = model
        self.names = list(target_names)
        modules = dict(model.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise GradientError(f"target layers not found in the model: {missing[:5]}")
        self.modules = {n: modules[n] for n in self.names}
        self._saved_flags = {p: p.requires_grad for p in model.parameters()}
        self._was_training = model.training
        self._hooks = []
        self._buffers: dict[str, torch.Tensor] = {}
        for p in model.parameters():
            p.requires_grad_(False)
        for n, m in self.modules.items():
            w = m.weight
            w.grad = None
            w.requires_grad_(True)
            if w.dtype != torch.float32:
                buf = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
                self._buffers[n] = buf

                def hook(p, buf=buf):
                    buf.add_(p.grad)
                    p.grad = None

                self._hooks.append(w.register_post_accumulate_grad_hook(hook))
        model.eval()
        self.num_examples = 0
        self.num_targets = 0
        self.num_batches = 0
        self.seconds = 0.0

    def step(self, batch: Mapping[str, torch.Tensor]) -> tuple[int, int]:
        """Forward and backward one batch; returns (examples, supervised targets) it held."""
        t0 = time.perf_counter()
        first = next(iter(batch.values()))
        n_examples = int(first.shape[0])
        count = supervised_targets(batch, self.model)
        if count > 0:
            out = self.model(**batch)
            loss = out.loss if hasattr(out, "loss") else out["loss"]
            if loss is None:
                raise GradientError("the model returned no loss; include 'labels' in every batch.")
            (loss.float() * count).backward()
        self.num_examples += n_examples
        self.num_targets += count
        self.num_batches += 1
        self.seconds += time.perf_counter() - t0
        return n_examples, count

    def sums(self) -> GradientSums:
        """The float32 sums in (d_out, d_in) orientation. Call once, then ``close()``."""
        out = {}
        for n, m in self.modules.items():
            if n in self._buffers:
                g = self._buffers[n]
            else:
                g = m.weight.grad
                if g is None:
                    g = torch.zeros_like(m.weight, dtype=torch.float32)
                m.weight.grad = None
            out[n] = g.t().contiguous() if is_transposed(m) else g
        self._buffers = {}
        return GradientSums(out, self.num_examples, self.num_targets, self.num_batches, self.seconds)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for m in self.modules.values():
            m.weight.grad = None
        for p, flag in self._saved_flags.items():
            p.requires_grad_(flag)
        self.model.train(self._was_training)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _move(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def accumulate(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    target_names: Sequence[str],
    *,
    progress: bool = True,
    total: int | None = None,
) -> GradientSums:
    """Run every batch through ``model`` and return the gradient sums of the target layers."""
    device = next(model.parameters()).device
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="gradient", unit="ex", dynamic_ncols=True)
    try:
        with GradientAccumulator(model, target_names) as acc:
            for batch in batches:
                n, _ = acc.step(_move(batch, device))
                if bar is not None:
                    bar.update(n)
                    bar.set_postfix(tok_s=f"{acc.num_targets / max(acc.seconds, 1e-9):.0f}", refresh=False)
            result = acc.sums()
    finally:
        if bar is not None:
            bar.close()
    return result


def check_finite(name: str, g: torch.Tensor) -> None:
    if not torch.isfinite(g).all():
        bad = int((~torch.isfinite(g)).sum())
        raise GradientError(
            f"the gradient of layer {name!r} has {bad} NaN/Inf entries. The loss overflowed or the "
            "weights are already broken: check the data (empty or extreme inputs), load the model in "
            "float32 for the estimate, or drop this layer from target_modules."
        )
