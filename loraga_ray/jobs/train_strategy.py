"""How the Train workers hold the model, decided on the driver before any worker starts.

``--dtype auto`` is float32 on CPU and bfloat16 on CUDA (float16 on GPUs without bfloat16).
``--train-strategy auto`` is DDP when the planner's training rows say the whole base fits one
GPU, else FSDP; on CPU workers it is DDP (their memory is the node's RAM, no hard limit the
planner knows). A run that fits the GPUs under no strategy is refused here, with the planner's
numbers, before the init estimate or any Train worker starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..options import TrainOptions
from ..training.strategy import StrategyError, resolve_dtype
from .init_strategy import PlanError

log = logging.getLogger(__name__)


@dataclass
class TrainDecision:
    strategy: str  # ddp or fsdp
    dtype: str  # of the frozen base
    per_worker_bytes: int | None = None  # the planner's figure for this strategy (None: not priced)
    memory_bytes: int | None = None  # one worker's GPU
    reason: str = ""


def decide_train(opts: TrainOptions, task: str, num_labels: int, resources) -> TrainDecision:
    """The strategy and base dtype of a run on these workers (``resources``: a WorkerResources)."""
    from ..core.sharded import ShardingError
    from ..planner import fmt_bytes, train_rows

    dtype = resolve_dtype(opts.dtype, resources.cuda, resources.bf16)
    asked = opts.train_strategy
    try:
        from ..planner import model_shape

        shape = model_shape(opts.model, task, opts.target_modules, num_labels)
    except ShardingError:
        if asked == "fsdp":
            raise StrategyError(f"{opts.model} has no repeated blocks (a ModuleList of layers of one class) to shard "
                                "with FSDP; use --train-strategy ddp.") from None
        return TrainDecision("ddp", dtype, reason="no repeated blocks to shard")
    if not resources.cuda or not resources.gpu_memory:
        return TrainDecision("ddp" if asked == "auto" else asked, dtype, reason="CPU workers" if asked == "auto" else "asked")
    memory = int(resources.gpu_memory)
    rows = {r.strategy: r for r in train_rows(shape, opts.workers, memory, dtype, opts.batch_size, opts.max_length,
                                              opts.rank, opts.activation_checkpointing, full=opts.init == "full")}
    fitting = [r for r in rows.values() if r.fits]
    if not fitting:
        options = ", ".join(f"{r.strategy} {fmt_bytes(r.per_worker_bytes)}" for r in rows.values())
        raise PlanError(
            f"training {opts.model} on {opts.workers} worker(s) of {fmt_bytes(memory)} fits under no strategy: per worker "
            f"{options} ({dtype} base, batch {opts.batch_size}, length {opts.max_length}"
            f"{', activation checkpointing' if opts.activation_checkpointing else ''}; `loraga-ray plan` shows the parts). "
            "Use more workers with --train-strategy fsdp (it divides the base by their number), GPUs with more memory, "
            "--dtype bfloat16, --activation-checkpointing, or a smaller --batch-size or --max-length."
        )
    if asked == "auto":
        row = fitting[0]
        return TrainDecision(row.strategy, dtype, row.per_worker_bytes, memory,
                             "fits" if row.strategy == "ddp" else "ddp does not fit")
    row = rows.get(asked) or rows["ddp"]
    if not row.fits:
        log.warning("the planner puts --train-strategy %s at %s per worker, more than the %s of one GPU (%s would fit); "
                    "going ahead as asked", asked, fmt_bytes(row.per_worker_bytes), fmt_bytes(memory),
                    fitting[0].strategy)
    return TrainDecision(asked, dtype, row.per_worker_bytes, memory, "asked")
