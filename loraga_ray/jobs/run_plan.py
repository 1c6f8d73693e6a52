"""What the driver works out before a training run starts workers: the data tables, the
evaluation split, the run's length, the target layers and the checks against the model's shapes
(on a weightless copy) and against the init artifact; then the Ray Data datasets of the run."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.artifact import ArtifactError, InitArtifact
from ..core.head import check_artifact_warmup
from ..core.targets import check_rank_limit, find_target_modules, target_shapes
from ..options import ARTIFACT_INITS, TrainOptions, artifact_max_rank, gradient_directions, load_kwargs

log = logging.getLogger(__name__)

ORDER_BLOCK_ROWS = 2048  # rows per block of the run's example stream


@dataclass
class RunPlan:
    """A training run, as planned on the driver."""

    spec: Any  # models.ModelSpec
    task: str
    num_labels: int
    train_table: Any  # pyarrow.Table
    eval_table: Any
    eval_source: str
    total_steps: int
    steps_per_epoch: int
    target_modules: list[str]
    shapes: dict[str, tuple[int, int]]  # (d_out, d_in) of the default targets
    heads: list[str] = field(default_factory=list)  # new heads, trained in full (modules_to_save)
    label_names: list[str] | None = None  # class id -> name, when the data named its classes

    def id2label(self) -> dict[int, str] | None:
        return {i: n for i, n in enumerate(self.label_names)} if self.label_names else None


def plan_run(opts: TrainOptions, artifact: InitArtifact | None = None) -> RunPlan:
    """Load the data tables and check the options against the data, the model's layer shapes and
    (for lora-ga) ``artifact``'s meta. No weights are loaded."""
    from ..data import infer_task, load_split
    from ..models import meta_model, new_head_modules, resolve_model

    train_table = load_split(opts.data, "train", seed=opts.seed, **load_kwargs(opts))
    task = infer_task(train_table)
    spec = resolve_model(opts.model, task, allow_pickle_weights=opts.allow_pickle_weights)
    num_labels = _num_labels(opts, train_table, task)
    eval_table, eval_source = _eval_table(opts)
    if task == "seq-cls":
        from ..data import check_labels

        check_labels(eval_table, f"{opts.data} (evaluation: {eval_source})", num_labels)
    steps_per_epoch = train_table.num_rows // opts.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"{opts.data} has {train_table.num_rows} training rows, fewer than one batch of --batch-size "
            f"{opts.batch_size}. Lower --batch-size or add data."
        )
    total_steps = int(opts.max_steps) if opts.epochs is None else max(1, int(round(opts.epochs * steps_per_epoch)))
    model = meta_model(spec, num_labels=num_labels)
    names = find_target_modules(model, opts.target_modules)
    shapes = target_shapes(model, names)
    from ..data import label_names

    plan = RunPlan(spec, task, num_labels, train_table, eval_table, eval_source, total_steps, steps_per_epoch, names,
                   shapes, new_head_modules(model, task), label_names(train_table) if task == "seq-cls" else None)
    check_rank(opts, shapes)
    if opts.head_warmup_steps and not plan.heads:
        raise ValueError(f"--head-warmup-steps fits a new classifier head, and this {task} run has none; drop it.")
    if opts.init in ARTIFACT_INITS and artifact is not None:
        check_artifact_fits(opts, plan, artifact, model)
    return plan


def _num_labels(opts: TrainOptions, train_table, task: str) -> int:
    if task != "seq-cls":
        return 2  # unused by causal LMs
    from ..data import num_classes

    try:
        return num_classes(train_table)  # its class names, else the largest id + 1
    except ValueError:
        raise ValueError(f"{opts.data} has no training rows.") from None


def _eval_table(opts: TrainOptions):
    """(eval rows, description): the validation split (held out of train, by a fixed seed, when
    the data has none: :func:`loraga_ray.data.holdout`), sampled down to --eval-samples."""
    from ..data import load_split, missing_splits, sample_table
    from ..data.sources import HOLDOUT_SEED

    table = load_split(opts.data, "validation", seed=opts.seed, **load_kwargs(opts))
    source = "validation split"
    if "validation" in missing_splits(opts.data):
        source = f"validation: {table.num_rows} rows held out of train (fixed seed {HOLDOUT_SEED})"
    if opts.eval_samples is not None and table.num_rows > opts.eval_samples:
        table = sample_table(table, opts.eval_samples, opts.seed)
        source += f", {opts.eval_samples} sampled"
    if table.num_rows == 0:
        raise ValueError(f"the evaluation split of {opts.data} is empty.")
    return table, source


def check_rank(opts: TrainOptions, shapes: dict[str, tuple[int, int]]) -> None:
    """A rank every target layer can take: r <= min(d_out, d_in) for LoRA, PiSSA and LoRA-One,
    2r for LoRA-GA and PEFT's LoRA-GA (both use 2r gradient directions)."""
    if opts.init == "full":
        return
    directions = gradient_directions(opts.init)
    fix = f"Lower --rank for --init {opts.init} on {opts.model}"
    if len({min(s) for s in shapes.values()}) > 1:
        fix += ", or drop the small layers with --target-modules"
    check_rank_limit(shapes, opts.rank, directions=directions, label=f"--rank {opts.rank}", fix=fix + ".")


def check_artifact_fits(opts: TrainOptions, plan: RunPlan, artifact: InitArtifact, model=None) -> None:
    """The artifact against the weightless model (its meta only): its layers exist with the same
    shapes, the rank fits it, and the target modules agree. The plan's targets become the
    artifact's. ``model``: the weightless model, if the caller has it."""
    from ..core.targets import weight_shape
    from ..models import meta_model

    where = opts.artifact or "the artifact"
    modules = dict((model or meta_model(plan.spec, num_labels=plan.num_labels)).named_modules())
    wrong = [n for n in artifact.target_modules
             if n not in modules or list(weight_shape(modules[n])) != list(artifact.meta["shapes"][n])]
    if wrong:
        raise ArtifactError(
            f"the artifact {where} was estimated on {artifact.meta.get('base_model')!r} "
            f"({artifact.meta.get('model_class')}); its layers {wrong[:3]} do not exist with the same shape in "
            f"{opts.model}. Use the base model it was estimated on, or drop --artifact to estimate a new init for "
            "this model."
        )
    allowed = artifact.k // gradient_directions(opts.init)
    if opts.rank > allowed:
        raise ArtifactError(
            f"--rank {opts.rank} is larger than the artifact {where} allows for --init {opts.init} (it holds "
            f"k={artifact.k} singular vectors, enough for rank <= {allowed}). Use --rank <= {allowed}, or estimate a "
            f"new artifact with max rank >= {artifact_max_rank(opts.init, opts.rank)}."
        )
    if opts.target_modules is not None and list(plan.target_modules) != artifact.target_modules:
        raise ArtifactError(
            f"--target-modules selects {len(plan.target_modules)} layers but the artifact holds "
            f"{len(artifact.target_modules)} different ones; drop --target-modules (the artifact decides) or "
            "estimate a new artifact with them."
        )
    check_artifact_warmup(artifact.meta, opts.head_warmup_steps, opts.head_warmup_lr, where, opts.init_batch_size)
    plan.target_modules = list(artifact.target_modules)


def check_artifact_weights(opts: TrainOptions, plan: RunPlan, artifact: InitArtifact) -> None:
    """The artifact's weight fingerprint against the real base weights (loads the model once,
    in bfloat16: the fingerprint is defined on bfloat16-rounded weights)."""
    import torch

    from ..models import load_model

    model = load_model(plan.spec, task=plan.task, num_labels=plan.num_labels, seed=opts.seed, dtype=torch.bfloat16)
    try:
        artifact.check_model(model)
    except ArtifactError as e:
        raise ArtifactError(f"--artifact {opts.artifact} does not belong to --model {opts.model}: {e}") from None
    finally:
        del model


# --------------------------------------------------------------------------------------------
# The run's datasets: a fixed example order, sharded by Ray Data
# --------------------------------------------------------------------------------------------


def example_order(num_rows: int, total_steps: int, batch_size: int, seed: int) -> np.ndarray:
    """Row indices of every example the run consumes, in order: epoch e is a permutation drawn
    from (seed, e), cut to whole batches; the epochs follow each other until total_steps batches.
    The order depends on nothing but these numbers, so a resumed run sees the same stream."""
    per_epoch = (num_rows // batch_size) * batch_size
    need = total_steps * batch_size
    parts, have, epoch = [], 0, 0
    while have < need:
        perm = np.random.default_rng([seed, epoch]).permutation(num_rows)[:per_epoch]
        parts.append(perm)
        have += len(perm)
        epoch += 1
    return np.concatenate(parts)[:need].astype(np.int64)


def build_datasets(opts: TrainOptions, plan: RunPlan) -> dict:
    """Ray Data datasets: ``train``, the whole run's example stream, tokenised by Ray Data tasks
    and split across the workers; ``eval``, the raw evaluation rows, which every worker reads and
    tokenises itself (they are few, and this spares a round of tasks per run); each worker
    evaluates every N-th batch of it."""
    import pyarrow as pa
    import ray.data

    from ..data import Encoder

    encoder = Encoder(plan.spec, plan.task, max_length=opts.max_length)
    order = example_order(plan.train_table.num_rows, plan.total_steps, opts.batch_size, opts.seed)
    chunks = [order[i : i + ORDER_BLOCK_ROWS] for i in range(0, len(order), ORDER_BLOCK_ROWS)]
    train = ray.data.from_arrow([plan.train_table.take(pa.array(c)) for c in chunks])
    train.context.enable_progress_bars = False  # the trainer's own step lines say more
    train = train.map_batches(encoder, batch_format="numpy", batch_size=512)
    evaluation = ray.data.from_arrow(plan.eval_table)
    evaluation.context.enable_progress_bars = False
    return {"train": train, "eval": evaluation}
