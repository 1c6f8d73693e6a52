"""PNG plots of a run: the loss curve and the gradient's singular values per layer.

matplotlib runs on the Agg backend (no display needed); each function writes one file and
closes its figure."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curve(history: Sequence[Mapping], path: str | os.PathLike, title: str | None = None) -> Path:
    """Train loss (every step) and eval loss (eval steps) against step; eval accuracy or
    exact match, when present, on a second axis."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    train = [(h["step"], h["train_loss"]) for h in history if h.get("train_loss") is not None]
    evals = [(h["step"], h["eval_loss"]) for h in history if h.get("eval_loss") is not None]
    score_key = next((k for k in ("eval_accuracy", "eval_exact_match") if any(k in h for h in history)), None)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        steps, losses = zip(*train)
        window = max(1, len(losses) // 15)
        if window > 1:  # per-step losses are noisy: show them faintly, with a trailing mean on top
            ax.plot(steps, losses, color="tab:blue", lw=0.8, alpha=0.3)
            smooth = [sum(losses[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(losses))]
            ax.plot(steps, smooth, color="tab:blue", lw=1.6, label=f"train loss (mean of {window} steps)")
        else:
            ax.plot(steps, losses, color="tab:blue", lw=1.2, label="train loss")
    if evals:
        ax.plot(*zip(*evals), color="tab:orange", lw=1.8, marker="o", ms=4, label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if score_key:
        scores = [(h["step"], h[score_key]) for h in history if h.get(score_key) is not None]
        ax2 = ax.twinx()
        ax2.plot(*zip(*scores), color="tab:green", lw=1.2, ls="--", marker="s", ms=3, label=score_key.replace("_", " "))
        ax2.set_ylabel(score_key.replace("eval_", "eval ").replace("_", " "))
        ax2.set_ylim(0, 1)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, loc="upper right", fontsize=8)
    ax.set_title(title or "loss")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_singular_values(singular_values: Mapping[str, Sequence[float]], path: str | os.PathLike,
                         title: str | None = None, top: int | None = None) -> Path:
    """Heatmap of log10 of the top singular values (columns) of each layer's gradient (rows),
    next to each layer's share of energy in its first singular value."""
    import numpy as np

    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(singular_values)
    rows = [np.asarray(singular_values[n], dtype=np.float64).reshape(-1) for n in names]
    k = min(len(r) for r in rows) if rows else 0
    if top is not None:
        k = min(k, top)
    mat = np.stack([r[:k] for r in rows]) if rows and k else np.zeros((1, 1))
    logm = np.log10(np.maximum(mat, 1e-30))
    height = min(2.0 + 0.18 * len(names), 14)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, height), dpi=110, gridspec_kw={"width_ratios": [3, 1]}, sharey=True)
    im = ax.imshow(logm, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("singular value index")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=6)
    fig.colorbar(im, ax=ax, label="log10 singular value", fraction=0.04)
    energy = (mat[:, 0] ** 2) / np.maximum((mat ** 2).sum(axis=1), 1e-300) if rows and k else np.zeros(1)
    ax2.barh(range(len(energy)), energy, color="tab:purple")
    ax2.set_xlim(0, 1)
    ax2.set_xlabel(f"σ1² / Σ top-{k} σ²")
    fig.suptitle(title or "gradient singular values per layer", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
