"""Single-process LoRA-GA init: gradient estimate, truncated SVD, artifact."""

from __future__ import annotations

import time
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from .artifact import InitArtifact, build_meta, head_state, weight_fingerprint
from .factors import SVD_METHODS, truncated_svd
from .gradients import GradientError, GradientSums, accumulate, check_finite
from .targets import check_not_quantised, check_rank_limit, classifier_heads, find_target_modules, target_shapes


def check_rank_fits(model: nn.Module, names: Sequence[str], max_rank: int) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of each target; raises if 2*max_rank singular vectors do not fit a layer."""
    if not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}.")
    shapes = target_shapes(model, names)
    check_rank_limit(shapes, max_rank, label=f"max_rank={max_rank}",
                     fix="Lower max_rank, or leave the small layers out of the target modules.")
    return shapes


def check_sample_counts(num_examples: int, num_targets: int) -> None:
    """The gradient estimate needs examples, and supervised targets among them."""
    if num_examples == 0:
        raise GradientError("the sample is empty: no example reached the gradient estimate. Pass a non-empty dataset.")
    if num_targets == 0:
        raise GradientError(
            f"the sample of {num_examples} examples holds zero supervised targets (every label is -100). "
            "Check the labels: causal-LM response tokens must carry their ids, and max_length must leave room for them."
        )


def factorize(
    sums: GradientSums,
    *,
    k: int,
    svd: str = "randomized",
    niter: int = 4,
    oversample: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Mean gradient -> top-k SVD, one layer at a time. Each layer's gradient is released as soon
    as its factors exist, so peak memory stays near one layer on top of what is still pending."""
    check_sample_counts(sums.num_examples, sums.num_targets)
    names = list(sums.sums)
    it = names
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(names, desc="svd", unit="layer", dynamic_ncols=True)
    out = {}
    for name in it:
        g = sums.sums.pop(name)
        if device is not None:
            g = g.to(device)
        g = g.float().div_(sums.num_targets)
        check_finite(name, g)
        U, S, V = truncated_svd(g, k, svd, niter=niter, oversample=oversample, seed=seed)
        del g
        out[name] = (U.cpu(), S.cpu(), V.cpu())
    return out


def estimate_init(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    target_modules: str | Sequence[str] | None = None,
    max_rank: int,
    svd: str = "randomized",
    seed: int = 0,
    niter: int = 4,
    oversample: int | None = None,
    base_model: str | None = None,
    dataset_fingerprint: str | None = None,
    progress: bool = False,
    total: int | None = None,
    heads: Sequence[str] | None = None,
    warmup: Mapping | None = None,
) -> InitArtifact:
    """Estimate the LoRA-GA init of ``model`` on ``batches`` and return its artifact.

    ``batches``: any iterable of dicts that ``model(**batch)`` accepts, each with ``labels`` so the
    model returns a loss. G of every target layer is the gradient of the mean loss over all
    supervised targets of all batches (independent of batch size), accumulated in float32; then
    its top k = 2*max_rank singular triplets are kept. The model is left as it was.

    ``heads``: modules whose weights the artifact keeps beside the factors because the gradient
    went through them (default: the classifier head of a ``*ForSequenceClassification`` model,
    none otherwise). A run trained from the artifact starts from exactly that head.

    ``warmup``: the stats :func:`loraga_ray.core.head.warm_up_head` returned, when the head was
    fitted first; the artifact records them, and a run from it must ask for that warm-up.
    """
    if svd not in SVD_METHODS:
        raise ValueError(f"svd={svd!r} is not one of {SVD_METHODS}.")
    check_not_quantised(model)
    names = find_target_modules(model, target_modules)
    shapes = check_rank_fits(model, names, max_rank)
    head = head_state(model, classifier_heads(model) if heads is None else heads) or None
    fingerprint = weight_fingerprint(model, names, head)
    t0 = time.perf_counter()
    sums = accumulate(model, batches, names, progress=progress, total=total)
    t1 = time.perf_counter()
    k = 2 * max_rank
    factors = factorize(sums, k=k, svd=svd, niter=niter, oversample=oversample, seed=seed)
    t2 = time.perf_counter()
    meta = build_meta(
        model=model,
        target_names=names,
        shapes=shapes,
        fingerprint=fingerprint,
        k=k,
        num_examples=sums.num_examples,
        num_targets=sums.num_targets,
        seed=seed,
        svd=svd,
        niter=niter,
        oversample=oversample,
        base_model=base_model,
        dataset_fingerprint=dataset_fingerprint,
        timings={"gradient_s": round(t1 - t0, 4), "svd_s": round(t2 - t1, 4)},
        extra={"num_batches": sums.num_batches, "workers": 1, **head_meta(head, seed, warmup)},
    )
    return InitArtifact(factors=factors, meta=meta, head=head)


def head_meta(head, seed: int, warmup: dict | None = None) -> dict:
    """meta.json's ``head`` entry before the artifact is saved (saving adds the sha256); with
    ``warmup`` (:func:`loraga_ray.core.head.warm_up_head`'s stats) the head was fitted first."""
    if not head:
        return {}
    return {"head": {"seed": seed, "modules": sorted({n.rsplit(".", 1)[0] for n in head}),
                     "shapes": {n: list(t.shape) for n, t in sorted(head.items())},
                     "warmup": dict(warmup) if warmup else {"steps": 0}}}
