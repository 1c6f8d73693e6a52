"""The maths of LoRA-GA: truncated SVD of G, then the initial factors A0, B0 and the scale eta.

With G ~ U diag(S) V^T (columns by descending singular value) and rank r:

* direction ``ArB2r`` (default): A0 = V[:, :r]^T, B0 = U[:, r:2r]
  ``A2rBr``: A0 = V[:, r:2r]^T, B0 = U[:, :r]
  ``ArBr``:  A0 = V[:, 1:2r:2]^T, B0 = U[:, 0:2r:2]
  ``random``: a seeded random split of the first 2r indices between A and B.
* scale ``stable`` (default): A0, B0 each times d_out^(1/4) / sqrt(gamma);
  ``gd``: each divided by eta; ``unit``: unchanged;
  ``weight_svd``: each times mean_i sqrt(sigma_i(W) / eta) over the top r singular values of W.
* eta = alpha / sqrt(r) (rsLoRA, default) or alpha / r.

After one SGD step of size lr on A and B alone the effective weight moves by
-lr * eta^2 (B0 B0^T G + G A0^T A0), which for ``stable`` is -lr * eta^2 c^2 times the best
rank-2r approximation of G: the first step follows full fine-tuning's.

LoRA-One (Zhang, Liu, Chen 2025) reads the same triplets differently (:func:`lora_one_factors`):
with -G = U' diag(S) V^T (U' = -U), B0 = U'[:, :r] diag(sqrt(S_r)) / sqrt(gamma * S_1) and
A0 = diag(sqrt(S_r)) V[:, :r]^T / sqrt(gamma * S_1), exactly as the authors' code builds them
(YuanheZ/LoRA-One, ``run_exp.py``, ``direction: LoRA-One``, ``scale: stable``: the SVD of -G,
square roots of the singular values, both factors divided by sqrt(S[0]) and by sqrt(gamma)). The
base weight is kept, so the model starts at W0 + eta*B0A0 = W0 - eta/(gamma*S_1) * G_r, where
G_r is the best rank-r approximation of G: one normalised, rank-r gradient step taken at init.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "gd", "unit", "weight_svd")
SVD_METHODS = ("randomized", "exact")
LORA_ONE_GAMMA = 128.0  # the authors' stable_gamma (conf/init/gradient.yaml)
LORA_GA_GAMMA = 16.0  # the LoRA-GA paper's gamma


@dataclass(frozen=True)
class Factors:
    A: torch.Tensor  # r x d_in, float32
    B: torch.Tensor  # d_out x r, float32
    eta: float  # adapter scaling
    c: float  # factor applied to A0 and B0 by the scale rule


def adapter_scaling(alpha: float, rank: int, use_rslora: bool = True) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def fix_signs(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make the largest-magnitude entry of each left singular vector positive (a canonical sign)."""
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U[idx, torch.arange(U.shape[1], device=U.device)])
    signs[signs == 0] = 1
    return U * signs, V * signs


def truncated_svd(
    G: torch.Tensor,
    k: int,
    method: str = "randomized",
    *,
    niter: int = 4,
    oversample: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k singular triplets of G (d_out x d_in): U (d_out x k), S (k), V (d_in x k), float32.

    ``exact`` runs ``torch.linalg.svd`` in float64. ``randomized`` runs ``torch.svd_lowrank`` in
    float32 with ``k + oversample`` columns (default oversample = k) and ``niter`` power
    iterations, seeded so the result is reproducible; it falls back to exact when the sketch
    would not be smaller than the matrix.
    """
    if method not in SVD_METHODS:
        raise ValueError(f"svd={method!r} is not one of {SVD_METHODS}.")
    m, n = G.shape
    if k > min(m, n):
        raise ValueError(f"cannot take {k} singular triplets of a {m}x{n} matrix (at most {min(m, n)}).")
    q = min(m, n, k + (k if oversample is None else oversample))
    if method == "exact" or q >= min(m, n):
        U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
        U, S, V = U[:, :k], S[:k], Vh[:k].T
    else:
        devices = [G.device] if G.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(G.float(), q=q, niter=niter)
        U, S, V = U[:, :k], S[:k], V[:, :k]
    U, V = fix_signs(U, V)
    return U.float().contiguous(), S.float().contiguous(), V.float().contiguous()


def split_indices(rank: int, direction: str, seed: int = 0) -> tuple[list[int], list[int]]:
    """Which of the first 2r singular directions go to A (rows) and to B (columns)."""
    r = rank
    if direction == "ArB2r":
        return list(range(0, r)), list(range(r, 2 * r))
    if direction == "A2rBr":
        return list(range(r, 2 * r)), list(range(0, r))
    if direction == "ArBr":
        return list(range(1, 2 * r, 2)), list(range(0, 2 * r, 2))
    if direction == "random":
        perm = random.Random(seed).sample(range(2 * r), 2 * r)
        return perm[r:], perm[:r]
    raise ValueError(f"direction={direction!r} is not one of {DIRECTIONS}.")


def scale_factor(
    scale: str,
    *,
    d_out: int,
    eta: float,
    gamma: float = 16.0,
    weight: torch.Tensor | None = None,
    rank: int | None = None,
) -> float:
    """The number A0 and B0 are each multiplied by."""
    if scale == "stable":
        if gamma <= 0:
            raise ValueError(f"gamma must be positive, got {gamma}.")
        return d_out**0.25 / math.sqrt(gamma)
    if scale == "gd":
        return 1.0 / eta
    if scale == "unit":
        return 1.0
    if scale == "weight_svd":
        if weight is None or rank is None:
            raise ValueError("scale='weight_svd' needs the layer's weight and the rank.")
        sv = torch.linalg.svdvals(weight.detach().double())[:rank]
        return float(torch.sqrt(sv / eta).mean())
    raise ValueError(f"scale={scale!r} is not one of {SCALES}.")


def lora_ga_factors(
    U: torch.Tensor,
    V: torch.Tensor,
    *,
    rank: int,
    alpha: float,
    direction: str = "ArB2r",
    scale: str = "stable",
    gamma: float = 16.0,
    use_rslora: bool = True,
    weight: torch.Tensor | None = None,
    seed: int = 0,
) -> Factors:
    """A0 (r x d_in), B0 (d_out x r) and eta from the top-2r singular vectors of G.

    ``weight`` (d_out x d_in) is needed only for ``scale='weight_svd'``.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}.")
    if 2 * rank > U.shape[1]:
        raise ValueError(f"rank {rank} needs {2 * rank} singular vectors but only {U.shape[1]} are available.")
    eta = adapter_scaling(alpha, rank, use_rslora)
    ia, ib = split_indices(rank, direction, seed)
    c = scale_factor(scale, d_out=U.shape[0], eta=eta, gamma=gamma, weight=weight, rank=rank)
    A = (V[:, ia].T * c).float().contiguous()
    B = (U[:, ib] * c).float().contiguous()
    return Factors(A=A, B=B, eta=eta, c=c)


def lora_one_factors(
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    *,
    rank: int,
    alpha: float,
    gamma: float = LORA_ONE_GAMMA,
    use_rslora: bool = True,
) -> Factors:
    """LoRA-One's A0 (r x d_in), B0 (d_out x r) and eta from the top-r singular triplets of G
    (U, S, V as :func:`truncated_svd` returns them): eta*B0A0 = -eta/(gamma*S_1) * G_r."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}.")
    if rank > U.shape[1]:
        raise ValueError(f"rank {rank} needs {rank} singular vectors but only {U.shape[1]} are available.")
    if not gamma > 0:
        raise ValueError(f"gamma must be positive, got {gamma}.")
    eta = adapter_scaling(alpha, rank, use_rslora)
    s1 = float(S[0])
    if not s1 > 0:
        raise ValueError("the gradient estimate of a layer is zero: LoRA-One has no direction to start from.")
    c = 1.0 / math.sqrt(gamma * s1)
    root = S[:rank].double().sqrt()
    B = (-U[:, :rank].double() * root * c).float().contiguous()  # U' = -U: the left vectors of -G
    A = (root[:, None] * V[:, :rank].double().T * c).float().contiguous()
    return Factors(A=A, B=B, eta=eta, c=c)
