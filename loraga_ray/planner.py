"""How much memory each worker needs, before anything runs: ``loraga-ray plan``.

The model is built on the meta device from its config (a ``config.json`` is enough, no weights),
so the counts are exact: every parameter, the target Linears, the repeated blocks. The rest is
arithmetic, with its assumptions stated here and in the printed table:

* **init, replicated** (every worker holds the whole model): the weights in ``dtype``, the target
  gradients in ``dtype`` (the backward writes them), their float32 sums, and activations.
* **init, sharded** (FSDP2 over the N workers, one ``fully_shard`` per block): 1/N of the weights,
  of the target gradients and of the float32 sums, plus one block gathered whole (its weights
  and its gradients before the reduce-scatter), and activations.
* **activations** of a decoder with fused attention (no stored attention matrix), per token and
  layer ``34·hidden`` bytes at 16 bits (scaled by ``dtype``), plus float32 logits over the
  vocabulary. They scale with the micro-batch, which the estimate is free to choose (the estimate
  is a token-weighted mean, independent of batch size): init lowers its micro-batch until it
  fits, down to 1.
* **train, DDP**: the whole base in ``dtype``; LoRA factors A and B in float32 (the master
  copies) with their gradients, DDP's gradient buckets and AdamW's two moments (20 bytes per
  LoRA parameter); activations of the per-worker batch.
* **train, FSDP** (FSDP2 over the N workers): 1/N of the base, plus the units gathered whole at
  a time: the root's own weights (embeddings, final norm, output head: the root is not resharded
  between forward and backward) and two blocks (the running one and the next, prefetched); 1/N
  of the LoRA factors with their gradients and AdamW state; activations as for DDP.
* **activations** when training add, per layer and token, a 16-bit copy of each target's input
  (the LoRA path casts it), and count the logits three times: in ``dtype``, the float32 copy the
  loss makes and its float32 log-softmax. With **activation checkpointing** only each block's input is kept
  (``hidden`` values per token and layer), plus one block's activations while it is recomputed.

``strategy`` is what ``auto`` picks: replicated when it fits (no collectives), else sharded, else
nothing fits and the plan says what to change.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass


GiB = 2**30
# what this version runs; the planner also prices the strategies that are coming
AVAILABLE = {"init": ("replicated", "sharded"), "train": ("ddp", "fsdp")}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str | int | float) -> int:
    """``24GiB``, ``80GB``, ``24g``, or a number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read the size {text!r}: write it like 24GiB, 80GB or 24e9.")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


@dataclass
class ModelShape:
    """The counts a plan needs, read from the weightless model."""

    total_params: int
    target_params: int
    num_targets: int
    blocks: int  # repeated transformer blocks (the FSDP units)
    block_params: int  # parameters of the largest block
    block_target_params: int  # its target parameters
    hidden: int
    layers: int
    vocab: int
    lora_params_per_rank: int  # sum over targets of d_in + d_out
    target_inputs: int = 0  # sum over targets of d_in (the LoRA path keeps a copy of each input)


def model_shape(model: str, task: str | None = None, target_modules=None, num_labels: int = 2) -> ModelShape:
    """The counts of ``model`` from its config. Raises QuantisedModelError for a quantised base and
    ShardingError for a model without repeated blocks."""
    from .core.sharded import ShardingError, no_blocks_message, repeated_blocks
    from .core.targets import check_not_quantised, find_target_modules
    from .models import meta_model, resolve_model

    spec = resolve_model(model, task, check=False)  # a config is enough
    m = meta_model(spec, num_labels=num_labels)
    check_not_quantised(m)
    names = find_target_modules(m, target_modules)
    if not repeated_blocks(m):
        raise ShardingError(no_blocks_message(model))
    return shape_of(m, names)


def shape_of(m, names) -> ModelShape:
    """The counts of a built model (real or on the meta device) with these target Linears."""
    from .core.sharded import repeated_blocks
    from .core.targets import target_shapes

    shapes = target_shapes(m, names)
    blocks = repeated_blocks(m)
    block_ids = {id(p) for p in blocks[0].parameters()}
    modules = dict(m.named_modules())
    block_target = sum(d_out * d_in for n, (d_out, d_in) in shapes.items() if id(modules[n].weight) in block_ids)
    config = m.config
    return ModelShape(
        total_params=sum(p.numel() for p in m.parameters()),
        target_params=sum(d_out * d_in for d_out, d_in in shapes.values()),
        num_targets=len(names),
        blocks=len(blocks),
        block_params=max(sum(p.numel() for p in b.parameters()) for b in blocks),
        block_target_params=block_target,
        hidden=int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0)),
        layers=len(blocks),
        vocab=int(getattr(config, "vocab_size", 0)),
        lora_params_per_rank=sum(d_out + d_in for d_out, d_in in shapes.values()),
        target_inputs=sum(d_in for _, d_in in shapes.values()),
    )


def activation_bytes(shape: ModelShape, batch: int, length: int, dtype_bytes: int) -> int:
    """Activations kept for the backward of one micro-batch (see the module doc)."""
    tokens = batch * length
    return int(tokens * shape.hidden * 34 * shape.layers * dtype_bytes / 2 + tokens * shape.vocab * 4)


@dataclass
class Row:
    stage: str
    strategy: str
    per_worker_bytes: int
    parts: dict
    fits: bool
    micro_batch: int | None = None


def init_rows(shape: ModelShape, workers: int, gpu_bytes: int, dtype: str, batch: int, length: int) -> list[Row]:
    b = DTYPE_BYTES[dtype]
    rows = []
    for strategy in ("replicated", "sharded"):
        if strategy == "replicated":
            fixed = {"weights": shape.total_params * b, "target gradients": shape.target_params * b,
                     "float32 sums": shape.target_params * 4}
        else:
            n = workers
            fixed = {"weights (1/N + one block)": shape.total_params * b / n + shape.block_params * b,
                     "target gradients (1/N + one block)": shape.target_params * b / n + shape.block_target_params * b,
                     "float32 sums (1/N)": shape.target_params * 4 / n}
        micro = batch
        while True:  # the estimate does not depend on the micro-batch: lower it until the row fits
            act = activation_bytes(shape, micro, length, b)
            total = int(sum(fixed.values()) + act)
            if total <= gpu_bytes or micro == 1:
                break
            micro = max(1, micro // 2)
        parts = {k: int(v) for k, v in fixed.items()} | {f"activations (micro-batch {micro} x {length})": act}
        rows.append(Row("init", strategy, total, parts, total <= gpu_bytes, micro))
    return rows


def train_activation_bytes(shape: ModelShape, batch: int, length: int, dtype_bytes: int,
                           checkpointing: bool) -> int:
    """Activations kept for the backward of one training micro-batch (see the module doc)."""
    tokens = batch * length
    per_layer = tokens * (shape.hidden * 34 * dtype_bytes / 2 + shape.target_inputs / max(1, shape.layers) * dtype_bytes)
    logits = tokens * shape.vocab * (dtype_bytes + 8)  # the logits, their float32 copy in the loss and its log-softmax
    if checkpointing:
        return int(tokens * shape.hidden * dtype_bytes * shape.layers + per_layer + logits)
    return int(per_layer * shape.layers + logits)


TRAIN_STRATEGIES = ("ddp", "fsdp")


def train_rows(shape: ModelShape, workers: int, gpu_bytes: int, dtype: str, batch: int, length: int,
               rank: int, activation_checkpointing: bool = False, full: bool = False) -> list[Row]:
    """Per-worker bytes of a LoRA training run under DDP and FSDP (see the module doc). ``full``
    (full fine-tuning): every weight trains, so it is float32 with its own gradient and moments."""
    b = DTYPE_BYTES[dtype]
    lora = shape.lora_params_per_rank * rank
    if full:
        lora, shape = shape.total_params, ModelShape(**dict(asdict(shape), total_params=0))
    per_worker_batch = max(1, math.ceil(batch / workers))
    act_name = (f"activations (batch {per_worker_batch} x {length}"
                f"{', checkpointed' if activation_checkpointing else ''})")
    act = train_activation_bytes(shape, per_worker_batch, length, b, activation_checkpointing)
    root = max(0, shape.total_params - shape.blocks * shape.block_params)
    rows = []
    for strategy in TRAIN_STRATEGIES:
        if strategy == "ddp":
            parts = {f"base weights ({dtype})": shape.total_params * b, "LoRA A, B (float32)": lora * 4,
                     ("their gradients and DDP's buckets" if workers > 1 else "their gradients"): lora * (8 if workers > 1 else 4),
                     "AdamW moments": lora * 8}
        else:
            n = workers
            parts = {f"base weights ({dtype}, 1/N)": shape.total_params * b / n,
                     "gathered: root weights and two blocks": (root + min(2, shape.blocks) * shape.block_params) * b,
                     "LoRA A, B, gradients, AdamW moments (float32, 1/N)": lora * 16 / n}
        parts[act_name] = act
        total = int(sum(parts.values()))
        rows.append(Row("train", strategy, total, {k: int(v) for k, v in parts.items()}, total <= gpu_bytes))
    if workers == 1:
        rows = rows[:1]  # one worker holds everything either way
    return rows


def pick(rows: list[Row]) -> Row | None:
    return next((r for r in rows if r.fits), None)


def plan(model: str, *, gpus: int, gpu_memory: str | int, dtype: str = "bfloat16", max_rank: int = 32, rank: int = 8,
         batch_size: int = 8, max_length: int = 512, task: str | None = None, target_modules=None,
         activation_checkpointing: bool = False) -> dict:
    """The plan as one JSON-able dict: ``init`` and ``train``, each with the chosen ``strategy``
    (None when nothing fits), its ``per_worker_bytes`` and ``fits``, and every row."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown --dtype {dtype!r}: use one of {', '.join(DTYPE_BYTES)}.")
    if gpus < 1:
        raise ValueError(f"--gpus must be a positive integer, got {gpus}.")
    gpu_bytes = parse_bytes(gpu_memory)
    shape = model_shape(model, task, target_modules)
    out = {"model": model, "gpus": gpus, "gpu_memory_bytes": gpu_bytes, "dtype": dtype, "max_rank": max_rank,
           "rank": rank, "batch_size": batch_size, "max_length": max_length,
           "activation_checkpointing": activation_checkpointing, "shape": asdict(shape)}
    for stage, rows in (("init", init_rows(shape, gpus, gpu_bytes, dtype, batch_size, max_length)),
                        ("train", train_rows(shape, gpus, gpu_bytes, dtype, batch_size, max_length, rank,
                                             activation_checkpointing))):
        chosen = pick(rows)
        best = chosen or min(rows, key=lambda r: r.per_worker_bytes)
        out[stage] = {"strategy": chosen.strategy if chosen else None, "per_worker_bytes": best.per_worker_bytes,
                      "fits": chosen is not None, "rows": [asdict(r) for r in rows]}
    return out


def refusal(p: dict, stage: str) -> str | None:
    """The message of a stage that fits under no strategy (None when it fits)."""
    s = p[stage]
    if s["fits"]:
        return None
    rows = ", ".join(f"{r['strategy']} {fmt_bytes(r['per_worker_bytes'])}" for r in s["rows"])
    if stage == "init":
        advice = ("Use more GPUs (the sharded strategy divides the weights, gradients and sums by their number), "
                  "GPUs with more memory, or fewer --target-modules.")
    else:
        advice = ("Use more GPUs (FSDP divides the base by their number), GPUs with more memory, --dtype bfloat16, "
                  "--activation-checkpointing, a smaller --batch-size or --max-length (activations), or fewer "
                  "--target-modules.")
    return (f"{stage} of {p['model']} fits on no strategy with {p['gpus']} x {fmt_bytes(p['gpu_memory_bytes'])}: per "
            f"worker {rows}. {advice}")


def format_plan(p: dict) -> str:
    lines = [f"plan for {p['model']}: {p['gpus']} GPU(s) x {fmt_bytes(p['gpu_memory_bytes'])}, {p['dtype']} weights, "
             f"max length {p['max_length']}",
             f"  {p['shape']['total_params']:,} parameters, {p['shape']['target_params']:,} in "
             f"{p['shape']['num_targets']} target Linears, {p['shape']['blocks']} blocks"]
    for stage in ("init", "train"):
        for r in p[stage]["rows"]:
            mark = "fits" if r["fits"] else "does not fit"
            chosen = " <- auto" if p[stage]["strategy"] == r["strategy"] else ""
            if r["strategy"] not in AVAILABLE[stage]:
                chosen += " (not in this version)"
            lines.append(f"{stage:5s} {r['strategy']:10s} {fmt_bytes(r['per_worker_bytes']):>11s} per worker, {mark}{chosen}")
            lines += [f"        {k}: {fmt_bytes(v)}" for k, v in r["parts"].items()]
        message = refusal(p, stage)
        if message:
            lines.append(f"  {message}")
    return "\n".join(lines)
