"""Randomized SVD of a matrix whose rows are spread over the ranks of a process group.

Rank i holds the row block G_i (m_i x n) of G = [G_1; G_2; ...]; nobody holds G. A randomized
SVD only ever needs G·X and Gᵀ·Y, and both come from local products plus small collectives:

* the same Ω (n x q) on every rank, drawn from the seed: Y_i = G_i Ω, locally;
* orthonormalise the tall, row-sharded Y by TSQR (float64): each rank QR-factors its Y_i = Q_i R_i,
  the q x q factors R_i are all-gathered and QR-factored again, [R_1; ...] = Q' R, and rank i's
  rows of the basis are Q_i Q'_i. Householder at both levels, so a G of lower rank than q (a
  gradient over few tokens) orthonormalises cleanly, where a Cholesky of YᵀY would break down;
* a power iteration is Z = Σ_i G_iᵀ Q_i (an all-reduce of n x q), orthonormalised locally (Z is
  the same on every rank), then Y_i = G_i Z and TSQR again;
* finally Bᵀ = Σ_i G_iᵀ Q_i (n x q, all-reduced), one small float64 SVD Bᵀ = V_b S U_bᵀ on every
  rank, and rank i's rows of U are Q_i U_b.

Traffic per layer is O(n·q) per iteration and O(world·q²) per TSQR, against O(m·n) to gather G.
It is the algorithm of ``torch.svd_lowrank`` (Halko, Martinsson, Tropp) with the row blocks kept
where they are. With q ≥ min(m, n) the basis spans G's range exactly and the result is the exact
SVD up to rounding (the whole computation then runs in float64).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _world(group) -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def _broadcast(t: torch.Tensor, group) -> torch.Tensor:
    """Rank 0's ``t`` on every rank: a factorisation computed everywhere from the same input is
    not bitwise the same on different hardware or BLAS builds, so one rank's result is used."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        t = t.contiguous()
        dist.broadcast(t, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return t


def tsqr(Y: torch.Tensor, group=None) -> torch.Tensor:
    """This rank's rows of an orthonormal basis of the row-sharded Y (float64, m_i x q)."""
    rank, world = _world(group)
    q = Y.shape[1]
    Y = Y.double()
    if Y.shape[0] > 0:
        Q_local, R = torch.linalg.qr(Y)  # m_i x min(m_i, q), min(m_i, q) x q
    else:
        Q_local, R = Y.new_zeros(0, 0), Y.new_zeros(0, q)
    if world == 1:
        return Q_local  # q <= m here, so Q_local is m x q
    # all-gather the R factors (padded to q x q for the collective), then stack only their real
    # rows: zero rows would let a rank-deficient stack put basis columns on rows no rank owns
    padded = Y.new_zeros(q, q)
    padded[: R.shape[0]] = R
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    sizes = torch.tensor([R.shape[0]], dtype=torch.int64, device=Y.device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes, group=group)
    rows = [int(s.item()) for s in all_sizes]
    stacked = torch.cat([g[:r] for g, r in zip(gathered, rows)])  # (sum of min(m_j, q)) >= q rows
    Q2 = _broadcast(torch.linalg.qr(stacked)[0], group)
    start = sum(rows[:rank])
    return Q_local @ Q2[start : start + R.shape[0]]


def sharded_svd(
    G: torch.Tensor,
    k: int,
    *,
    oversample: int | None = None,
    niter: int = 4,
    seed: int = 0,
    exact: bool = False,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k SVD of the row-sharded G. Returns (U_i: this rank's m_i x k rows of U, S: k, V: n x k),
    float32; S and V are the same on every rank. Collective: every rank calls it with its own rows
    (possibly none) of the same matrix. ``exact`` (or a sketch as wide as the matrix) uses
    q = min(m, n) columns in float64, which is the exact SVD up to rounding."""
    n = G.shape[1]
    m = int(_all_reduce(torch.tensor([G.shape[0]], dtype=torch.float64, device=G.device), group).item())
    if k > min(m, n):
        raise ValueError(f"cannot take {k} singular triplets of a {m}x{n} matrix (at most {min(m, n)}).")
    q = min(m, n, k + (k if oversample is None else oversample))
    if exact or q >= min(m, n):
        q, dtype, niter = min(m, n), torch.float64, max(niter, 2)
    else:
        dtype = torch.float32
    Gd = G.to(dtype)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, q, generator=gen, dtype=torch.float64).to(device=G.device, dtype=dtype)
    Q = tsqr(Gd @ omega, group)
    for _ in range(niter):
        Z = _all_reduce(Gd.T @ Q.to(dtype), group)  # n x q
        Z = _broadcast(torch.linalg.qr(Z.double())[0], group).to(dtype)
        Q = tsqr(Gd @ Z, group)
    Bt = _all_reduce((Gd.T @ Q.to(dtype)).double(), group)  # n x q = (Qᵀ G)ᵀ
    V, S, Ubt = torch.linalg.svd(Bt, full_matrices=False)  # Bt = V S Ubᵀ, so B = Ub S Vᵀ
    V, S, Ubt = (_broadcast(t, group) for t in (V[:, :k], S[:k], Ubt[:k]))
    U = Q @ Ubt.T
    return U.float().contiguous(), S.float().contiguous(), V.float().contiguous()
