"""Arithmetic on training curves (lists of per-step metric dicts): trailing means, the final
training loss, and the step at which a curve first reaches a given loss."""

from __future__ import annotations


def steps_to_reach(history, target: float, window: int = 10) -> int | None:
    """First step at which the moving average (``window`` steps) of the training loss is at or
    below ``target``; None if it never gets there. The first ``window - 1`` steps (fewer for a
    shorter curve) do not count: their mean is over too few steps."""
    points = [(h["step"], h["train_loss"]) for h in history if h.get("train_loss") is not None]
    means = moving_mean([v for _, v in points], window)
    first = min(window, len(points)) - 1
    return next((points[i][0] for i in range(first, len(points)) if means[i] <= target), None)


def moving_mean(values, window: int = 10) -> list[float]:
    """Trailing mean over up to ``window`` values."""
    return [sum(values[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def final_train_loss(history, window: int = 10) -> float:
    """Moving average of the last ``window`` training losses."""
    losses = [h["train_loss"] for h in history if h.get("train_loss") is not None]
    tail = losses[-window:]
    return sum(tail) / len(tail)


def collapsed(history, window: int = 10) -> bool:
    """A run that diverged or collapsed: its final training loss (mean of the last ``window``)
    ends above its start (mean of the first ``window``) by more than RISE_TOLERANCE, or, after a
    real drop (at least MEANINGFUL_DROP of the start), it gave back more than half of it
    (final - best > (start - best) / 2, ``best`` the lowest ``window``-step mean), as a run that
    falls back to predicting the majority class does. A slow run that barely moves is neither. A
    steps-to-loss figure would say nothing about such a run."""
    losses = [h["train_loss"] for h in history if h.get("train_loss") is not None]
    if len(losses) < 2 * window:
        return False
    means = moving_mean(losses, window)[window - 1:]
    start, final, best = means[0], means[-1], min(means)
    rose = final > start * (1 + RISE_TOLERANCE)
    gave_back = start - best >= MEANINGFUL_DROP * start and final - best > (start - best) / 2
    return rose or gave_back


RISE_TOLERANCE = 0.02  # a final loss this far (relative) above the start is more than noise
MEANINGFUL_DROP = 0.1  # a drop of at least this much of the start counts as progress that can be lost


def first_train_loss(history, window: int = 10) -> float:
    """Mean of the first ``window`` training losses."""
    losses = [h["train_loss"] for h in history if h.get("train_loss") is not None]
    head = losses[:window]
    return sum(head) / len(head)
