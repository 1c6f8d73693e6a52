"""Which init strategy runs, decided by the planner's arithmetic before any worker loads the model.

``replicated``: every worker holds the whole model and float32 sums of every target gradient;
the driver adds the workers' sums one layer at a time and takes each SVD.
``sharded``: the workers form a torch.distributed group and shard the model with FSDP2; each
holds 1/N of the weights and of the sums, the SVD runs on the shards (core.sharded_svd), and
only the factors reach the driver.
``auto``: replicated when it fits the workers' memory (no collectives), else sharded, else the
run is refused with the planner's numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..options import InitOptions

log = logging.getLogger(__name__)


class PlanError(ValueError):
    """The init fits under no strategy on these workers (the message has the numbers)."""


@dataclass
class Decision:
    strategy: str
    batch_size: int  # the micro-batch: lowered to fit (the estimate does not depend on it)
    per_worker_bytes: int | None = None
    memory_bytes: int | None = None  # what one worker may use
    reason: str = ""


def worker_memory(probes: list[dict]) -> int:
    """What the smallest worker may use: its GPU's memory, or on CPU its node's RAM shared by the
    workers on that node."""
    per_node: dict[str, int] = {}
    for p in probes:
        per_node[p["node"]] = per_node.get(p["node"], 0) + 1
    return min(p["device_bytes"] if p["cuda"] else p["device_bytes"] // per_node[p["node"]] for p in probes)


def model_plan(opts: InitOptions, task: str, num_labels: int):
    """The model's counts for the planner, from its config alone, checked on the driver before any
    worker starts: a quantised base is refused, and so is ``--init-strategy sharded`` on a model
    without repeated blocks. None when there are no blocks (replicated is the only way then)."""
    from ..core.sharded import ShardingError
    from ..planner import model_shape

    try:
        return model_shape(opts.model, task, opts.target_modules, num_labels)
    except ShardingError:
        if opts.init_strategy == "sharded":
            raise
        return None


_UNREAD = object()


def decide(opts: InitOptions, task: str, num_labels: int, probes: list[dict], shape=_UNREAD) -> Decision:
    """The strategy and micro-batch of this run, from the model's counts (``model_plan``, read
    here unless given: None means no blocks) and the workers' memory; raises PlanError when the
    asked strategy cannot fit."""
    from ..planner import fmt_bytes, init_rows

    asked = opts.init_strategy
    memory = worker_memory(probes)
    if shape is _UNREAD:
        shape = model_plan(opts, task, num_labels)
    if shape is None:
        return Decision("replicated", opts.batch_size, memory_bytes=memory, reason="no repeated blocks to shard")
    rows = {r.strategy: r for r in init_rows(shape, opts.workers, memory, opts.dtype, opts.batch_size, opts.max_length)}
    if opts.workers == 1 and asked == "auto":
        rows.pop("sharded")  # one worker holds everything either way
    if asked == "auto":
        row = next((r for r in rows.values() if r.fits), None)
    else:
        row = rows[asked]
    cuda = all(p["cuda"] for p in probes)
    if row is not None and not row.fits and not cuda:
        # CPU workers: the node's RAM is shared with everything else and the planner's figures are
        # GPU arithmetic; the run may still fit, so it goes ahead with a warning
        log.warning("the planner puts --init-strategy %s at %s per worker, more than the %s each CPU worker may use; "
                    "going ahead (CPU memory is not a hard limit the planner knows)", row.strategy,
                    fmt_bytes(row.per_worker_bytes), fmt_bytes(memory))
    elif row is None and not cuda:
        row = rows["replicated"]
        log.warning("the planner finds no strategy that fits %s per CPU worker; going ahead replicated",
                    fmt_bytes(memory))
    elif row is None or not row.fits:
        options = ", ".join(f"{r.strategy} {fmt_bytes(r.per_worker_bytes)}" for r in rows.values())
        raise PlanError(
            f"init of {opts.model} on {opts.workers} worker(s) of {fmt_bytes(memory)} fits under "
            f"{'no strategy' if asked == 'auto' else '--init-strategy ' + asked}: per worker {options} (`loraga-ray plan` "
            "shows the parts). Use more workers with --init-strategy sharded (it divides weights, gradients and sums "
            "by their number), GPUs with more memory, --dtype bfloat16, or fewer --target-modules."
        )
    return Decision(row.strategy, min(opts.batch_size, row.micro_batch or opts.batch_size), row.per_worker_bytes, memory,
                    reason="asked" if asked != "auto" else "fits" if row.strategy == "replicated" else
                    "replicated does not fit")
