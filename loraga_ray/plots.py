"""PNG plots: a run's loss curve, the gradient's singular values per layer, a search's eval loss
per trial, and methods' loss curves side by side (the demo).

matplotlib runs on the Agg backend (no display needed); each function writes one file through
:func:`figure`, which also lays it out and closes it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from .curves import moving_mean

METHOD_COLORS = {"lora-ga": "tab:blue", "lora": "tab:orange", "pissa": "tab:green", "peft-lora-ga": "tab:purple",
                 "full": "tab:gray", "lora-one": "tab:red"}


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def figure(path: str | os.PathLike, title: str | None = None, *, figsize=(7, 4.2), title_size: int | None = None,
           **subplots) -> Iterator:
    """``(fig, ax)`` of a new figure, saved as ``path`` (its folder created) and closed on exit."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=figsize, dpi=110, **subplots)
    try:
        yield fig, ax
        if title is not None:
            (ax[0] if isinstance(ax, (list, tuple)) or hasattr(ax, "shape") else ax).set_title(title, fontsize=title_size)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def plot_loss_curve(history: Sequence[Mapping], path: str | os.PathLike, title: str | None = None) -> Path:
    """Train loss (every step) and eval loss (eval steps) against step; eval accuracy or
    exact match, when present, on a second axis."""
    train = [(h["step"], h["train_loss"]) for h in history if h.get("train_loss") is not None]
    evals = [(h["step"], h["eval_loss"]) for h in history if h.get("eval_loss") is not None]
    score_key = next((k for k in ("eval_accuracy", "eval_exact_match") if any(k in h for h in history)), None)
    with figure(path, title or "loss") as (fig, ax):
        if train:
            steps, losses = zip(*train)
            window = max(1, len(losses) // 15)
            if window > 1:  # per-step losses are noisy: show them faintly, with a trailing mean on top
                ax.plot(steps, losses, color="tab:blue", lw=0.8, alpha=0.3)
                ax.plot(steps, moving_mean(list(losses), window), color="tab:blue", lw=1.6,
                        label=f"train loss (mean of {window} steps)")
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
    return Path(path)


def plot_singular_values(singular_values: Mapping[str, Sequence[float]], path: str | os.PathLike,
                         title: str | None = None, top: int | None = None) -> Path:
    """Heatmap of log10 of the top singular values (columns) of each layer's gradient (rows),
    next to each layer's share of energy in its first singular value."""
    import numpy as np

    names = list(singular_values)
    rows = [np.asarray(singular_values[n], dtype=np.float64).reshape(-1) for n in names]
    k = min(len(r) for r in rows) if rows else 0
    if top is not None:
        k = min(k, top)
    mat = np.stack([r[:k] for r in rows]) if rows and k else np.zeros((1, 1))
    logm = np.log10(np.maximum(mat, 1e-30))
    height = min(2.0 + 0.18 * len(names), 14)
    with figure(path, figsize=(10, height), ncols=2, gridspec_kw={"width_ratios": [3, 1]}, sharey=True) as (fig, axes):
        ax, ax2 = axes
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
    return Path(path)


def plot_eval_loss(curves: Mapping[str, Sequence[tuple[int, float]]], path: str | os.PathLike, *,
                   best: str | None = None, title: str | None = None) -> Path:
    """Eval loss against step, one line per trial (``curves``: label -> (step, loss) points);
    the ``best`` label drawn thicker."""
    from matplotlib.ticker import MaxNLocator

    with figure(path, title, figsize=(8, 4.8), title_size=10) as (fig, ax):
        for label, points in curves.items():
            if not points:
                continue
            steps, losses = zip(*points)
            is_best = label == best
            ax.plot(steps, losses, marker="o", ms=3, lw=2.4 if is_best else 1.2, label=label + (" (best)" if is_best else ""))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_ylabel("eval loss")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, loc="upper right")
        else:
            ax.text(0.5, 0.5, "no trial reached an evaluation", ha="center", va="center", transform=ax.transAxes)
    return Path(path)


def plot_method_curves(histories: Mapping[str, Sequence[Mapping]], path: str | os.PathLike, *,
                       target: float | None = None, target_label: str = "LoRA's final train loss",
                       title: str | None = None, window: int = 10) -> Path:
    """Each method's training loss (faint per step, a ``window``-step trailing mean on top) and
    eval loss, against step; ``target`` as a dotted line."""
    with figure(path, title) as (fig, ax):
        for method, hist in histories.items():
            color = METHOD_COLORS.get(method)
            points = [(h["step"], h["train_loss"]) for h in hist if h.get("train_loss") is not None]
            if points:
                steps, losses = zip(*points)
                ax.plot(steps, losses, color=color, alpha=0.25, lw=0.8)
                ax.plot(steps, moving_mean(list(losses), window), color=color, lw=1.8,
                        label=f"{method} train loss ({window}-step mean)")
            ev = [(h["step"], h["eval_loss"]) for h in hist if h.get("eval_loss") is not None]
            if ev:
                ax.plot(*zip(*ev), color=color, ls="--", marker="o", ms=3, lw=1, label=f"{method} eval loss")
        if target is not None:
            ax.axhline(target, color="gray", ls=":", lw=1, label=target_label)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return Path(path)
