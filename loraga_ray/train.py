"""Fine-tuning on Ray Train: LoRA-GA, LoRA, PiSSA and full fine-tuning in one harness.

``loraga-ray train`` (and :func:`fit`) runs one fine-tuning job:

1. checks everything that can be checked cheaply (options, data, rank against the model's
   layer shapes on a weightless copy, the artifact's fingerprint, cluster size, MLflow store);
2. for ``--init lora-ga`` without ``--artifact``, estimates the init first and keeps the
   artifact in ``<out>/init_artifact``;
3. runs a Ray Train ``TorchTrainer`` (:func:`build_trainer`): N workers with DDP (gloo on CPU,
   NCCL on GPU), the training examples streamed and sharded by Ray Data in an order fixed by the
   seed, AdamW with linear warmup and cosine decay, gradient clipping, bf16 autocast on GPU,
   evaluation every ``eval_every`` steps and at the end, checkpoints via ``ray.train.report``;
4. writes ``<out>``: ``adapter/`` (a PEFT adapter for the *original* base model) or ``model/``
   (full weights, for ``--init full``), ``metrics.json``, ``loss_curve.png``, and records the
   run in MLflow (``<out>/mlflow.db`` unless ``--tracking-uri`` says otherwise).

Batch size is the *global* batch (examples per optimizer step); each of the N workers gets
batch_size / N. ``--resume`` continues a stopped run from its last checkpoint with the same data
order and optimizer state. Train V2 resumes a run with the same ``(storage_path, name)``; here
that is ``<out>/ray`` and ``train``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .adapters import InitState, apply_lora_ga, exact_names_regex, infer_task_type, init_state, save_adapter, set_init_state
from .artifact import ArtifactError, InitArtifact
from .factors import DIRECTIONS, SCALES
from .targets import TargetError, find_target_modules, is_transposed, weight_shape

log = logging.getLogger(__name__)

INITS = ("lora-ga", "lora", "pissa", "full", "peft-lora-ga")
DEVICES = ("auto", "cpu", "cuda")
PISSA_INIT = "pissa_niter_4"  # PEFT's fast PiSSA (randomized SVD with 4 power iterations)
HEAD_MODULES = ("classifier", "score")  # sequence-classification heads, trained in full

# Options that define a run: a resumed run must keep them (data order, schedule, model).
RUN_DEFINING = (
    "model", "data", "init", "rank", "alpha", "gamma", "direction", "scale", "use_rslora", "lr",
    "max_steps", "epochs", "batch_size", "warmup_ratio", "weight_decay", "max_grad_norm", "workers",
    "eval_every", "eval_samples", "checkpoint_every", "max_length", "seed", "target_modules",
    "init_samples", "init_batch_size", "task", "text_column", "label_column", "prompt_column",
    "response_column", "lora_dropout",
)

OPTIONS_FILE = "train_options.json"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
LOSS_CURVE_FILE = "loss_curve.png"
INIT_ARTIFACT_DIR = "init_artifact"
RAY_DIR = "ray"
RAY_RUN_NAME = "train"


@dataclass
class TrainOptions:
    """Everything one fine-tuning run needs. ``batch_size`` is global (per optimizer step)."""

    model: str
    data: str
    out: str
    init: str = "lora-ga"  # lora-ga | lora | pissa | full
    artifact: str | None = None
    rank: int = 8
    alpha: float = 16.0
    gamma: float = 16.0
    direction: str = "ArB2r"
    scale: str = "stable"
    use_rslora: bool = True
    lr: float = 2e-4
    max_steps: int | None = 200
    epochs: float | None = None  # when set, it decides the length and max_steps is ignored
    batch_size: int = 16
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    workers: int = 1
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs (device=auto)
    cpus_per_worker: float = 1.0
    eval_every: int = 50
    eval_samples: int | None = None
    checkpoint_every: int | None = None  # default: every eval
    max_length: int = 128
    seed: int = 0
    target_modules: list[str] | None = None
    init_samples: int = 256  # for lora-ga without an artifact
    init_batch_size: int = 8
    task: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    tracking_uri: str | None = None
    experiment: str = "loraga-ray"
    parent_run_id: str | None = None
    run_name: str | None = None
    resume: bool = False
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps; --resume continues
    report_every: int | None = None  # None: report at evals/checkpoints and every ~2 s; N: every N steps
    address: str | None = None
    device: str = "auto"  # auto | cpu | cuda
    lora_dropout: float = 0.0


# --------------------------------------------------------------------------------------------
# Checks and planning (driver side, cheap)
# --------------------------------------------------------------------------------------------


def validate_options(opts: TrainOptions) -> None:
    """Raise ValueError for options that cannot work, before anything is loaded."""

    def bad(msg):
        raise ValueError(msg)

    if opts.init not in INITS:
        bad(f"unknown --init {opts.init!r}: use one of {', '.join(INITS)}.")
    if opts.artifact is not None and opts.init != "lora-ga":
        bad(f"--artifact is a LoRA-GA init artifact; it does not apply to --init {opts.init}. Drop it or use --init lora-ga.")
    if opts.direction not in DIRECTIONS:
        bad(f"unknown --direction {opts.direction!r}: use one of {', '.join(DIRECTIONS)}.")
    if opts.scale not in SCALES:
        bad(f"unknown --scale {opts.scale!r}: use one of {', '.join(SCALES)}.")
    if opts.device not in DEVICES:
        bad(f"unknown --device {opts.device!r}: use one of {', '.join(DEVICES)}.")
    if isinstance(opts.rank, bool) or not isinstance(opts.rank, int) or opts.rank < 1:
        bad(f"--rank must be a positive integer, got {opts.rank!r}.")
    for name in ("alpha", "gamma", "lr"):
        if not (getattr(opts, name) > 0):
            bad(f"--{name} must be positive, got {getattr(opts, name)!r}.")
    if not isinstance(opts.workers, int) or opts.workers < 1:
        bad(f"--workers must be a positive integer, got {opts.workers!r}.")
    if not isinstance(opts.batch_size, int) or opts.batch_size < 1:
        bad(f"--batch-size must be a positive integer, got {opts.batch_size!r}.")
    if opts.batch_size % opts.workers:
        bad(f"--batch-size {opts.batch_size} is the global batch and must be a multiple of --workers {opts.workers} "
            f"(each worker takes batch_size / workers examples per step).")
    if opts.epochs is None:
        if opts.max_steps is None or opts.max_steps < 1:
            bad(f"--max-steps must be a positive integer (or pass --epochs), got {opts.max_steps!r}.")
    elif not opts.epochs > 0:
        bad(f"--epochs must be positive, got {opts.epochs!r}.")
    if not 0 <= opts.warmup_ratio < 1:
        bad(f"--warmup-ratio must be in [0, 1), got {opts.warmup_ratio}.")
    if opts.weight_decay < 0 or opts.max_grad_norm < 0 or opts.lora_dropout < 0 or opts.lora_dropout >= 1:
        bad("--weight-decay and --max-grad-norm must be >= 0 and --lora-dropout in [0, 1).")
    if opts.eval_every < 1 or (opts.checkpoint_every is not None and opts.checkpoint_every < 1):
        bad("--eval-every and --checkpoint-every must be positive.")
    if opts.eval_samples is not None and opts.eval_samples < 1:
        bad(f"--eval-samples must be positive, got {opts.eval_samples}.")
    if opts.gpus_per_worker is not None and opts.gpus_per_worker < 0:
        bad(f"--gpus-per-worker must be >= 0, got {opts.gpus_per_worker}.")
    if opts.device == "cpu" and opts.gpus_per_worker:
        bad("--device cpu with --gpus-per-worker > 0: drop one of them.")
    if opts.cpus_per_worker < 0:
        bad(f"--cpus-per-worker must be >= 0, got {opts.cpus_per_worker}.")
    if opts.max_length < 2:
        bad(f"--max-length must be at least 2, got {opts.max_length}.")
    if opts.init_samples < 1 or opts.init_batch_size < 1:
        bad("--init-samples and --init-batch-size must be positive.")
    if opts.report_every is not None and opts.report_every < 1:
        bad(f"--report-every must be positive, got {opts.report_every}.")
    if opts.stop_after is not None and opts.stop_after < 1:
        bad(f"stop_after must be positive, got {opts.stop_after}.")


@dataclass
class Plan:
    """What the driver works out before starting workers."""

    spec: Any  # models.ModelSpec
    task: str
    num_labels: int
    train_table: Any  # pyarrow.Table
    eval_table: Any
    eval_source: str
    total_steps: int
    steps_per_epoch: int
    target_modules: list[str]
    heads: list[str] = field(default_factory=list)


def _load_kwargs(opts: TrainOptions) -> dict:
    return dict(task=opts.task, text_column=opts.text_column, label_column=opts.label_column,
                prompt_column=opts.prompt_column, response_column=opts.response_column, seed=opts.seed)


def _eval_table(opts: TrainOptions, train_table):
    """(train, eval, description): the validation split, else 10% of train held out by seed."""
    import pyarrow as pa

    from .data import load_split, sample_table

    try:
        table = load_split(opts.data, "validation", **_load_kwargs(opts))
        source = "validation split"
    except ValueError as e:
        if "split" not in str(e):
            raise
        n = train_table.num_rows
        n_eval = max(1, n // 10)
        if n - n_eval < 1:
            raise ValueError(f"{opts.data} has no validation split and only {n} training rows: too few to hold some out for evaluation.")
        rng = np.random.default_rng([opts.seed, 7919])
        perm = rng.permutation(n)
        eval_idx, train_idx = np.sort(perm[:n_eval]), np.sort(perm[n_eval:])
        log.warning("%s has no validation split: holding out %d of %d training rows (seed %d) for evaluation.",
                    opts.data, n_eval, n, opts.seed)
        table, train_table = train_table.take(pa.array(eval_idx)), train_table.take(pa.array(train_idx))
        source = f"{n_eval} rows held out of train (seed {opts.seed})"
    if opts.eval_samples is not None and table.num_rows > opts.eval_samples:
        table = sample_table(table, opts.eval_samples, opts.seed)
        source += f", {opts.eval_samples} sampled"
    if table.num_rows == 0:
        raise ValueError(f"the evaluation split of {opts.data} is empty.")
    return train_table, table, source


def meta_model(spec, task: str, num_labels: int = 2):
    """The model's architecture without weights (torch 'meta' device): layer names and shapes
    for checks, at no memory cost."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = {"local_files_only": True}
    if spec.gguf_file:
        kwargs["gguf_file"] = spec.gguf_file
    config = AutoConfig.from_pretrained(spec.path, **kwargs)
    with torch.device("meta"):
        if task == "seq-cls":
            config.num_labels = num_labels
            if config.pad_token_id is None:
                eos = config.eos_token_id
                config.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
            return AutoModelForSequenceClassification.from_config(config)
        return AutoModelForCausalLM.from_config(config)


def _heads(model, task: str) -> list[str]:
    if task != "seq-cls":
        return []
    names = {n for n, _ in model.named_modules()}
    return [h for h in HEAD_MODULES if h in names]


def check_rank(opts: TrainOptions, model, names: Sequence[str]) -> None:
    """A rank every target layer can take: r <= min(d_out, d_in) for LoRA and PiSSA, 2r for
    LoRA-GA (it uses 2r gradient directions)."""
    if opts.init == "full":
        return
    modules = dict(model.named_modules())
    factor = 2 if opts.init in ("lora-ga", "peft-lora-ga") else 1
    shapes = {n: weight_shape(modules[n]) for n in names}
    limit = min(min(s) for s in shapes.values()) // factor
    if opts.rank > limit:
        name, shape = min(shapes.items(), key=lambda kv: min(kv[1]))
        need = f"2r = {2 * opts.rank}" if factor == 2 else f"r = {opts.rank}"
        raise TargetError(
            f"--rank {opts.rank} is too large for {opts.model}: --init {opts.init} needs {need} <= min(d_out, d_in) "
            f"on every target layer, and {name!r} is {shape[0]}x{shape[1]}. Use --rank <= {limit}"
            + (" or drop the small layers with --target-modules." if len(set(map(min, shapes.values()))) > 1 else ".")
        )


def plan_run(opts: TrainOptions) -> Plan:
    """Load the data tables and check the options against the data and the model's shapes.
    No weights are loaded."""
    from .data import infer_task, load_split
    from .models import resolve_model

    train_table = load_split(opts.data, "train", **_load_kwargs(opts))
    task = infer_task(train_table)
    spec = resolve_model(opts.model, task)
    num_labels = 2
    if task == "seq-cls":
        import pyarrow.compute as pc

        lo, hi = pc.min(train_table["label"]).as_py(), pc.max(train_table["label"]).as_py()
        if lo is None:
            raise ValueError(f"{opts.data} has no training rows.")
        if lo < 0:
            raise ValueError(f"{opts.data}: labels must be class ids 0..num_labels-1, found {lo}.")
        num_labels = max(2, int(hi) + 1)
    train_table, eval_table, eval_source = _eval_table(opts, train_table)

    global_batch = opts.batch_size
    steps_per_epoch = train_table.num_rows // global_batch
    if steps_per_epoch < 1:
        raise ValueError(
            f"{opts.data} has {train_table.num_rows} training rows, fewer than one batch of --batch-size {global_batch}. "
            "Lower --batch-size or add data."
        )
    if opts.epochs is not None:
        total_steps = max(1, int(round(opts.epochs * steps_per_epoch)))
    else:
        total_steps = int(opts.max_steps)

    model = meta_model(spec, task, num_labels)
    names = find_target_modules(model, opts.target_modules)
    check_rank(opts, model, names)
    plan = Plan(spec, task, num_labels, train_table, eval_table, eval_source, total_steps, steps_per_epoch, names, _heads(model, task))
    if opts.init == "lora-ga" and opts.artifact:
        check_artifact_shapes(opts, plan, model)
    return plan


def check_artifact_shapes(opts: TrainOptions, plan: Plan, model) -> InitArtifact:
    """Cheap artifact checks on the weightless model: it loads, its layers exist with the same
    shapes, the rank fits it, and the target modules agree."""
    art = InitArtifact.load(opts.artifact)
    modules = dict(model.named_modules())
    wrong = [n for n in art.target_modules if n not in modules or list(weight_shape(modules[n])) != list(art.meta["shapes"][n])]
    if wrong:
        raise ArtifactError(
            f"the artifact {opts.artifact} was estimated on {art.meta.get('base_model')!r} ({art.meta.get('model_class')}); "
            f"its layers {wrong[:3]} do not exist with the same shape in {opts.model}. Use the base model it was estimated "
            "on, or drop --artifact to estimate a new init for this model."
        )
    if opts.rank > art.max_rank:
        raise ArtifactError(
            f"--rank {opts.rank} is larger than the artifact {opts.artifact} allows (it holds k={art.k} singular vectors, "
            f"enough for rank <= {art.max_rank}). Use --rank <= {art.max_rank}, or estimate a new artifact with max rank >= {opts.rank}."
        )
    if opts.target_modules is not None and list(plan.target_modules) != art.target_modules:
        raise ArtifactError(
            f"--target-modules selects {len(plan.target_modules)} layers but the artifact holds {len(art.target_modules)} "
            f"different ones; drop --target-modules (the artifact decides) or estimate a new artifact with them."
        )
    plan.target_modules = art.target_modules
    return art


def check_artifact(opts: TrainOptions, plan: Plan) -> None:
    """The artifact's weight fingerprint against the real base weights (loads the model once,
    in bfloat16: the fingerprint is defined on bfloat16-rounded weights)."""
    from .models import load_model

    art = InitArtifact.load(opts.artifact)
    model = load_model(plan.spec, task=plan.task, num_labels=plan.num_labels, seed=opts.seed, dtype=torch.bfloat16)
    try:
        art.check_model(model)
    except ArtifactError as e:
        raise ArtifactError(f"--artifact {opts.artifact} does not belong to --model {opts.model}: {e}") from None
    finally:
        del model


# --------------------------------------------------------------------------------------------
# Cluster resources
# --------------------------------------------------------------------------------------------

_CUDA_PROBES: dict[float, bool] = {}


def _workers_see_cuda(gpus_per_worker: float) -> bool:
    """Whether a task holding ``gpus_per_worker`` GPUs sees a CUDA device (logical GPUs on a CPU
    machine do not). The driver's own view answers when it has CUDA; otherwise a probe task."""
    if torch.cuda.is_available():
        return True
    key = float(min(gpus_per_worker, 1.0))
    if key not in _CUDA_PROBES:
        import ray

        @ray.remote(num_cpus=0, num_gpus=key)
        def probe():
            import torch as _t

            return bool(_t.cuda.is_available())

        try:
            _CUDA_PROBES[key] = bool(ray.get(probe.remote(), timeout=120))
        except Exception as e:  # no node can take the task
            log.warning("could not probe GPU workers for CUDA (%s); training on CPU.", e)
            _CUDA_PROBES[key] = False
    return _CUDA_PROBES[key]


@dataclass
class Resources:
    gpus_per_worker: float
    cpus_per_worker: float
    cuda: bool  # workers train on CUDA (NCCL); False: CPU + gloo

    def scaling(self, workers: int):
        from ray.train import ScalingConfig

        if self.gpus_per_worker > 0:
            return ScalingConfig(num_workers=workers, use_gpu=True,
                                 resources_per_worker={"CPU": self.cpus_per_worker, "GPU": self.gpus_per_worker})
        return ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": self.cpus_per_worker})


def plan_resources(opts: TrainOptions) -> Resources:
    """Check the workers fit the cluster and decide CPU/GPU. Needs Ray to be initialised."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    n = opts.workers
    if opts.device == "cpu":
        gpw = 0.0
    elif opts.gpus_per_worker is not None:
        gpw = float(opts.gpus_per_worker)
    else:
        gpw = 1.0 if (gpus >= 1 or opts.device == "cuda") else 0.0
    if opts.device == "cuda" and gpw == 0:
        raise ValueError("--device cuda with --gpus-per-worker 0: pass a positive --gpus-per-worker.")
    if gpw > 0 and n * gpw > gpus + 1e-9:
        raise ValueError(
            f"--workers {n} with {gpw:g} GPU each needs {n * gpw:g} GPUs, but the Ray cluster has {gpus:g}. "
            f"Use --workers <= {int(gpus // gpw) if gpw else 0}, a smaller --gpus-per-worker, or --device cpu."
        )
    cpw = float(opts.cpus_per_worker)
    if n * cpw + 1 > cpus + 1e-9:
        raise ValueError(
            f"--workers {n} with {cpw:g} CPU each needs {n * cpw:g} CPUs plus 1 for Ray Data, but the Ray cluster has "
            f"{cpus:g}. Use fewer --workers or a smaller --cpus-per-worker (e.g. 0.5), or add nodes."
        )
    cuda = gpw > 0 and _workers_see_cuda(gpw)
    if opts.device == "cuda" and not cuda:
        raise ValueError("--device cuda, but the GPU workers see no CUDA device. Check the drivers, or use --device cpu.")
    if gpw > 0 and not cuda:
        log.warning("the cluster's GPUs are logical (workers see no CUDA device): training on CPU with gloo.")
    return Resources(gpw, cpw, cuda)


# --------------------------------------------------------------------------------------------
# Data: a fixed example order, sharded by Ray Data
# --------------------------------------------------------------------------------------------

ORDER_BLOCK_ROWS = 2048


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


def build_datasets(opts: TrainOptions, plan: Plan):
    """Ray Data datasets: ``train``, the whole run's example stream, tokenised by Ray Data tasks
    and split across the workers; ``eval``, the raw evaluation rows, which every worker reads and
    tokenises itself (they are few, and this spares a round of tasks per run); each worker
    evaluates every N-th batch of it."""
    import pyarrow as pa
    import ray.data

    from .data import Encoder

    encoder = Encoder(plan.spec, plan.task, max_length=opts.max_length)
    order = example_order(plan.train_table.num_rows, plan.total_steps, opts.batch_size, opts.seed)
    chunks = [order[i : i + ORDER_BLOCK_ROWS] for i in range(0, len(order), ORDER_BLOCK_ROWS)]
    train = ray.data.from_arrow([plan.train_table.take(pa.array(c)) for c in chunks])
    train.context.enable_progress_bars = False  # the trainer's own step lines say more
    train = train.map_batches(encoder, batch_format="numpy", batch_size=512)
    evaluation = ray.data.from_arrow(plan.eval_table)
    evaluation.context.enable_progress_bars = False
    return {"train": train, "eval": evaluation}


# --------------------------------------------------------------------------------------------
# Model construction (each worker)
# --------------------------------------------------------------------------------------------


def artifact_payload(path: str | os.PathLike) -> dict:
    """The artifact as numpy arrays + meta, to put in the object store (zero-copy for workers)."""
    art = InitArtifact.load(path)
    return {"meta": art.meta, "factors": {n: tuple(t.numpy() for t in f) for n, f in art.factors.items()}}


def artifact_from_payload(payload: dict) -> InitArtifact:
    factors = {n: tuple(torch.tensor(np.array(a)) for a in f) for n, f in payload["factors"].items()}
    return InitArtifact(factors=factors, meta=payload["meta"])


def build_model(opts: TrainOptions, spec, task: str, num_labels: int, artifact: InitArtifact | None = None):
    """The base model (seeded head) with the chosen init applied, on CPU, in float32.

    lora-ga: apply_lora_ga from the artifact; lora: PEFT's default init; pissa: PEFT's PiSSA
    (the initial factors are recorded so save_adapter writes an adapter for the original base);
    full: every parameter trainable. All LoRA variants use the same rsLoRA setting, no dropout by
    default, and train sequence-classification heads in full (modules_to_save)."""
    from peft import LoraConfig, get_peft_model

    from .models import load_model

    model = load_model(spec, task=task, num_labels=num_labels, seed=opts.seed)
    heads = _heads(model, task)
    if opts.init == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if opts.init == "lora-ga":
        if artifact is None:
            raise ValueError("init lora-ga needs an init artifact.")
        return apply_lora_ga(
            model, artifact, rank=opts.rank, alpha=opts.alpha, direction=opts.direction, scale=opts.scale,
            gamma=opts.gamma, use_rslora=opts.use_rslora, lora_dropout=opts.lora_dropout,
            modules_to_save=heads or None, seed=opts.seed,
        )
    names = find_target_modules(model, opts.target_modules)
    modules = dict(model.named_modules())
    extra = {}
    if opts.init == "peft-lora-ga":
        from peft.tuners.lora import LoraGAConfig

        peft_scale = {"gd": "gd_scale"}.get(opts.scale, opts.scale)
        extra = dict(lora_ga_config=LoraGAConfig(direction=opts.direction, scale=peft_scale, stable_gamma=int(opts.gamma)))
    config = LoraConfig(
        r=opts.rank,
        lora_alpha=opts.alpha,
        target_modules=exact_names_regex(names),
        use_rslora=opts.use_rslora,
        lora_dropout=opts.lora_dropout,
        init_lora_weights={"lora": True, "pissa": PISSA_INIT, "peft-lora-ga": "lora_ga"}[opts.init],
        fan_in_fan_out=all(is_transposed(modules[n]) for n in names),
        modules_to_save=heads or None,
        task_type=infer_task_type(model),
        **extra,
    )
    if opts.init == "peft-lora-ga":
        _peft_loraga_preprocess(opts, spec, task, model, config)
    torch.manual_seed(opts.seed)
    peft_model = get_peft_model(model, config)
    if opts.init in ("pissa", "peft-lora-ga"):
        inner = peft_model.base_model.model
        state = InitState(opts.rank, float(opts.alpha), 0.0, opts.use_rslora, opts.init, opts.init, 0.0, None)
        for name in names:
            layer = inner.get_submodule(name)
            state.eta = float(layer.scaling["default"])
            state.A0[name] = layer.lora_A["default"].weight.detach().float().cpu().clone()
            state.B0[name] = layer.lora_B["default"].weight.detach().float().cpu().clone()
        set_init_state(peft_model, state)
    return peft_model


def _peft_loraga_preprocess(opts: TrainOptions, spec, task: str, model, config) -> None:
    """PEFT's built-in LoRA-GA (a baseline): its gradient estimate on the same sample our init
    pipeline draws (init_samples rows of the train split, seed), in batches of init_batch_size."""
    from peft.tuners.lora import preprocess_loraga

    from .data import Encoder, iter_batches, load_split, sample_table
    from .models import load_tokenizer

    table = sample_table(load_split(opts.data, "train", **_load_kwargs(opts)), opts.init_samples, opts.seed)
    tok = load_tokenizer(spec)
    batches = list(iter_batches(table, Encoder(tok, task, max_length=opts.max_length), opts.init_batch_size, tok.pad_token_id, task))
    device = next(model.parameters()).device

    def train_step():
        for b in batches:
            model(**{k: v.to(device) for k, v in b.items()}).loss.backward()

    preprocess_loraga(model, config, train_step)


def _plain(model):
    """The model under DDP."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# --------------------------------------------------------------------------------------------
# Checkpoints: safetensors for tensors, JSON for the rest
# --------------------------------------------------------------------------------------------

TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
INIT_STATE_DIR = "init_state"
EXPORT_DIR = "export"


def _trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in _plain(model).named_parameters() if p.requires_grad]


def save_checkpoint(folder: Path, model, optimizer, state: dict) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    save_file({n: p.detach().cpu().contiguous() for n, p in _trainable(model)}, str(folder / TRAINABLE_FILE))
    osd = optimizer.state_dict()
    tensors, extra = {}, {}
    for idx, st in osd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                extra[f"{idx}.{k}"] = v
    save_file(tensors, str(folder / OPTIMIZER_FILE))
    state = dict(state, optimizer={"param_groups": osd["param_groups"], "extra": extra})
    (folder / STATE_FILE).write_text(json.dumps(state, indent=1))
    s = init_state(_plain(model))
    if s is not None:
        s.save(folder / INIT_STATE_DIR)


def load_checkpoint(folder: Path, model, optimizer) -> dict:
    """Restore trainable weights and optimizer state; returns the JSON state (step, history...)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    weights = load_file(str(folder / TRAINABLE_FILE))
    params = _trainable(model)
    names = [n for n, _ in params]
    if sorted(names) != sorted(weights):
        raise RuntimeError(
            f"the checkpoint in {folder} holds {len(weights)} trainable tensors that do not match this model's "
            f"{len(names)}; it belongs to a run with other options."
        )
    with torch.no_grad():
        for n, p in params:
            p.copy_(weights[n].to(p.device, p.dtype))
    state = json.loads((folder / STATE_FILE).read_text())
    tensors = load_file(str(folder / OPTIMIZER_FILE))
    opt_state: dict[int, dict] = {}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[k] = v
    for key, v in state["optimizer"]["extra"].items():
        idx, k = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[k] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer"]["param_groups"]})
    if (folder / INIT_STATE_DIR).is_dir() and init_state(_plain(model)) is not None:
        set_init_state(_plain(model), InitState.load(folder / INIT_STATE_DIR))
    return state


def export_final(folder: Path, model, init: str, tokenizer) -> None:
    """The deliverable, inside the final checkpoint: adapter/ for the original base, or model/."""
    plain = _plain(model)
    if init == "full":
        target = Path(folder) / EXPORT_DIR / "model"
        plain.save_pretrained(str(target), safe_serialization=True)
        tokenizer.save_pretrained(str(target))
    else:
        save_adapter(plain, Path(folder) / EXPORT_DIR / "adapter")


# --------------------------------------------------------------------------------------------
# The training loop (each worker)
# --------------------------------------------------------------------------------------------


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the base lr for update number ``step`` (0-based): linear warmup to 1 over
    ``warmup`` updates, then cosine decay towards 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _exact_matches(module, batch: dict, responses, tokenizer, device, autocast) -> int:
    """Greedy generation from each example's prompt (its -100-labelled prefix, i.e. the ids of
    Encoder.encode_prompt) and comparison of the stripped text with the reference response."""
    ids, labels = batch["input_ids"], batch["labels"]
    prompts, answer_lens = [], []
    for i in range(ids.shape[0]):
        supervised = (labels[i] != -100).nonzero()
        start = int(supervised[0]) if len(supervised) else int(batch["attention_mask"][i].sum())
        prompts.append(ids[i, :start])
        answer_lens.append(len(supervised))
    width = max(1, max(len(p) for p in prompts))
    pad = tokenizer.pad_token_id
    x = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, p in enumerate(prompts):  # left padding for generation
        if len(p):
            x[i, width - len(p):] = p
            mask[i, width - len(p):] = 1
    with autocast():
        out = module.generate(input_ids=x.to(device), attention_mask=mask.to(device), max_new_tokens=max(answer_lens) + 1,
                              do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)
    return sum(int(t.strip() == str(r).strip()) for t, r in zip(texts, responses))


def evaluate(model, batches: list, task: str, device, autocast, tokenizer, world: int) -> dict:
    """Loss over all eval targets (token-weighted for causal-lm), plus accuracy (seq-cls) or exact
    match (causal-lm); every worker evaluates its share, the sums are all-reduced."""
    from .data import supervised_count

    module = _plain(model)
    module.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss sum, loss count, correct, examples
    with torch.no_grad():
        for cpu_batch, responses in batches:
            batch = _to(cpu_batch, device)
            n = supervised_count(cpu_batch, task)
            if n == 0:
                continue
            with autocast():
                out = module(**batch)
            sums[0] += float(out.loss.float()) * n
            sums[1] += n
            if task == "seq-cls":
                sums[2] += float((out.logits.argmax(-1) == batch["labels"]).sum())
                sums[3] += batch["labels"].numel()
            else:
                sums[2] += _exact_matches(module, cpu_batch, responses, tokenizer, device, autocast)
                sums[3] += len(responses)
    if world > 1:
        import torch.distributed as dist

        t = sums.to(device)
        dist.all_reduce(t)
        sums = t.cpu()
    loss_sum, count, correct, total = sums.tolist()
    metrics = {"eval_loss": loss_sum / count if count else float("nan")}
    metrics["eval_accuracy" if task == "seq-cls" else "eval_exact_match"] = correct / total if total else float("nan")
    return metrics


def _say(msg: str) -> None:
    """One progress line from a worker. sys.stdout.write, not print: Ray Train patches print
    into its logger, which shows every line twice on the driver."""
    import sys

    sys.stdout.write(f"[loraga-ray train] {msg}\n")
    sys.stdout.flush()


def run_training_loop(config: dict) -> None:
    """``train_loop_per_worker`` of the TorchTrainer (see :func:`build_trainer` for ``config``)."""
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from .data import Encoder, collate
    from .models import load_tokenizer

    opts = TrainOptions(**config["options"])
    task, total, warmup = config["task"], config["total_steps"], config["warmup_steps"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if config["cuda"] else torch.device("cpu")
    if isinstance(device, list):
        device = device[0]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext

    tokenizer = load_tokenizer(config["spec"])
    artifact = artifact_from_payload(ray.get(config["artifact_ref"])) if config.get("artifact_ref") is not None else None
    torch.manual_seed(opts.seed)
    model = build_model(opts, config["spec"], task, config["num_labels"], artifact)
    del artifact
    model = ray.train.torch.prepare_model(model, move_to_device=device)
    params = [p for _, p in _trainable(model)]
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)

    start_step, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(Path(d), model, optimizer)
        start_step, history = int(state["step"]), list(state["history"])
        if rank == 0:
            _say(f"resuming from step {start_step} of {total}")

    eval_batches = None
    pad_id = tokenizer.pad_token_id
    per_worker = opts.batch_size // world
    ckpt_every = opts.checkpoint_every or opts.eval_every
    shard = ray.train.get_dataset_shard("train")
    print_every = max(1, total // 20)
    t_start = last_report = time.perf_counter()
    last_reported_step = start_step
    report_interval = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0))

    for i, raw in enumerate(shard.iter_batches(batch_size=per_worker, batch_format="numpy", prefetch_batches=1)):
        step = i + 1
        if step > total:
            break
        if step <= start_step:
            continue  # consumed before the checkpoint: same stream, skipped
        if step == start_step + 1:
            t_start = time.perf_counter()  # the rate counts training, not start-up
        lr = opts.lr * lr_factor(step - 1, total, warmup)
        for g in optimizer.param_groups:
            g["lr"] = lr
        torch.manual_seed(_step_seed(opts.seed, step, rank))  # dropout: the same after a resume
        model.train()
        batch = _to(collate(raw, pad_id, task), device)
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm if opts.max_grad_norm > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # Reports are batched: Ray Train's controller takes one report per poll (every
        # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default), so a report every step would throttle
        # training. Rank 0 decides when enough time has passed; the all-reduce tells every worker.
        time_to_report = float(rank == 0 and opts.report_every is None and time.perf_counter() - last_report >= report_interval)
        stats = torch.tensor([float(loss.detach()), float(grad_norm), time_to_report], dtype=torch.float64, device=loss.device)
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(stats)
            stats[:2] /= world
        metrics = {"step": step, "train_loss": float(stats[0]), "lr": lr, "grad_norm": float(stats[1]),
                   "epoch": step / config["steps_per_epoch"]}

        done = step == total
        stopping = opts.stop_after is not None and step >= opts.stop_after and not done
        if step % opts.eval_every == 0 or done:
            if eval_batches is None:
                eval_batches = []
                encoder = Encoder(tokenizer, task, max_length=opts.max_length)
                eval_it = ray.train.get_dataset_shard("eval").iter_batches(batch_size=max(per_worker, 8), batch_format="numpy")
                for j, eraw in enumerate(eval_it):
                    if j % world == rank:
                        eval_batches.append((collate(encoder(eraw), pad_id, task), list(eraw.get("response", []))))
            metrics.update(evaluate(model, eval_batches, task, device, autocast, tokenizer, world))
        if done:
            metrics["done"] = True
        history.append(metrics)
        if rank == 0 and (step % print_every == 0 or done or "eval_loss" in metrics):
            rate = (step - start_step - 1) / max(time.perf_counter() - t_start, 1e-9)
            extra = "".join(f" {k} {v:.4f}" for k, v in metrics.items() if k.startswith("eval_"))
            _say(f"step {step}/{total} loss {metrics['train_loss']:.4f} lr {lr:.2e}{extra} ({rate:.2f} step/s)")

        checkpoint_now = step % ckpt_every == 0 or done or stopping
        report_now = (checkpoint_now or "eval_loss" in metrics or stats[2] > 0
                      or (opts.report_every is not None and step % opts.report_every == 0))
        if not report_now:
            continue
        window = history[len(history) - (step - last_reported_step):]
        report = dict(metrics, train_loss=float(np.mean([h["train_loss"] for h in window])), step_metrics=window)
        tmp = None
        if checkpoint_now and rank == 0:
            tmp = Path(tempfile.mkdtemp(prefix="loraga-ckpt-"))
            save_checkpoint(tmp, model, optimizer, {"step": step, "total_steps": total, "history": history,
                                                    "done": done, "init": opts.init, "seed": opts.seed})
            if done:
                export_final(tmp, model, opts.init, tokenizer)
        try:
            ray.train.report(report, checkpoint=Checkpoint.from_directory(str(tmp)) if tmp else None)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        last_reported_step, last_report = step, time.perf_counter()
        if stopping:
            if rank == 0:
                _say(f"stopped after step {step} as asked; continue with --resume")
            return


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


def warmup_steps(opts: TrainOptions, total: int) -> int:
    return int(math.ceil(opts.warmup_ratio * total))


def create_mlflow_run(opts: TrainOptions, tracking_uri: str, plan: Plan | None = None) -> str:
    """An MLflow run for these options: params, and the parent tag when opts.parent_run_id."""
    from . import tracking

    params = {k: getattr(opts, k) for k in (
        "model", "data", "init", "rank", "alpha", "gamma", "direction", "scale", "use_rslora", "lr", "batch_size",
        "workers", "seed", "max_steps", "epochs", "warmup_ratio", "weight_decay", "max_grad_norm", "max_length",
        "eval_every", "eval_samples", "target_modules", "artifact", "lora_dropout", "init_samples")}
    if plan is not None:
        params.update(task=plan.task, total_steps=plan.total_steps, eval_source=plan.eval_source,
                      num_target_modules=len(plan.target_modules))
    tags = {"loraga.init": opts.init, "loraga.out": str(opts.out)}
    name = opts.run_name or (f"{opts.init} lr={opts.lr:g}" if opts.init == "full" else f"{opts.init} r={opts.rank} lr={opts.lr:g}")
    return tracking.create_run(tracking_uri, opts.experiment, params=params, run_name=name,
                               parent_run_id=opts.parent_run_id, tags=tags)


def build_trainer(opts: TrainOptions, *, name: str, storage_path: str, callbacks=(), mlflow_run_id: str | None = None,
                  plan: Plan | None = None, resources: Resources | None = None):
    """The Ray Train ``TorchTrainer`` of one run. Ray must be initialised.

    Reports (every worker reports the same dict; Ray keeps rank 0's): ``step``, ``train_loss``
    (mean over the steps since the previous report), ``lr``, ``grad_norm``, ``epoch``, and
    ``step_metrics`` (the list of per-step metric dicts since the previous report); at eval steps
    also ``eval_loss`` and ``eval_accuracy`` (seq-cls) or ``eval_exact_match`` (causal-lm). There
    is a report at every eval and checkpoint step, and otherwise every ``opts.report_every`` steps,
    or (None) whenever ~2 s have passed: Ray Train's controller takes one report per poll, so a
    report per step would throttle training. The last report adds ``done: True`` and carries the
    checkpoint with ``export/adapter`` (or ``export/model``). For Tune schedulers use
    ``time_attr="step"``. ``callbacks`` go to the RunConfig (e.g. Tune's ``TuneReportCallback()``).

    init lora-ga needs ``opts.artifact`` (``fit`` estimates one when it is missing). MLflow:
    metrics go to ``mlflow_run_id`` if given; else, when ``opts.tracking_uri`` is set, a new run
    is created (a child of ``opts.parent_run_id`` if set); its id is ``trainer.mlflow_run_id``.
    """
    import ray
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from . import tracking

    validate_options(opts)
    if opts.init == "lora-ga" and not opts.artifact:
        raise ValueError("build_trainer with init lora-ga needs opts.artifact (an init artifact folder); "
                         "fit() estimates one when it is missing.")
    plan = plan or plan_run(opts)
    resources = resources or plan_resources(opts)
    if mlflow_run_id is not None and not opts.tracking_uri:
        raise ValueError("build_trainer: mlflow_run_id needs opts.tracking_uri (the store the run lives in).")
    if mlflow_run_id is None and opts.tracking_uri:
        mlflow_run_id = create_mlflow_run(opts, opts.tracking_uri, plan)

    config = {
        "options": asdict(opts),
        "spec": plan.spec,
        "task": plan.task,
        "num_labels": plan.num_labels,
        "total_steps": plan.total_steps,
        "steps_per_epoch": plan.steps_per_epoch,
        "warmup_steps": warmup_steps(opts, plan.total_steps),
        "cuda": resources.cuda,
        "cpus_per_worker": resources.cpus_per_worker,
        "artifact_ref": ray.put(artifact_payload(opts.artifact)) if opts.init == "lora-ga" else None,
    }
    all_callbacks = list(callbacks)
    if mlflow_run_id is not None:
        all_callbacks.append(tracking.MlflowReportCallback(opts.tracking_uri, mlflow_run_id))
    ctx_opts = ray.data.DataContext.get_current().execution_options
    ingest = ExecutionOptions(preserve_order=True, resource_limits=ctx_opts.resource_limits,
                              exclude_resources=ctx_opts.exclude_resources)
    trainer = TorchTrainer(
        run_training_loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if resources.cuda else "gloo"),
        scaling_config=resources.scaling(opts.workers),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_path),
            callbacks=all_callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=0),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets=build_datasets(opts, plan),
        # One worker reads the stream directly (no split coordinator actor to start).
        dataset_config=DataConfig(datasets_to_split=["train"] if opts.workers > 1 else [], execution_options=ingest,
                                  enable_shard_locality=False),
    )
    trainer.mlflow_run_id = mlflow_run_id
    return trainer


# --------------------------------------------------------------------------------------------
# The CLI path
# --------------------------------------------------------------------------------------------


def _atomic_copytree(src: Path, dest: Path) -> None:
    from .fsutil import atomic_folder

    with atomic_folder(dest) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.rename(path)


def _check_out_folder(opts: TrainOptions, out: Path) -> dict | None:
    """Refuse to mix runs in one folder; on --resume, check the options match the stopped run."""
    saved_file = out / OPTIONS_FILE
    if not opts.resume:
        if saved_file.exists() or (out / RAY_DIR).exists():
            raise ValueError(f"{out} already holds a training run. Pass --resume to continue it, or choose another --out.")
        return None
    if not saved_file.exists():
        raise ValueError(f"--resume: {out} holds no training run to continue (no {OPTIONS_FILE}). Drop --resume to start one.")
    saved = json.loads(saved_file.read_text())
    current = asdict(opts)
    saved_artifact = saved.get("artifact")
    differ = [k for k in RUN_DEFINING if k != "artifact" and saved.get(k) != current.get(k)]
    if current.get("artifact") not in (None, saved_artifact):
        differ.append("artifact")
    if differ:
        pairs = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differ)
        raise ValueError(f"--resume must keep the options of the stopped run in {out}; these differ: {pairs}. "
                         "Drop them (the saved ones are used) or start a new run in another --out.")
    return saved


def estimate_artifact(opts: TrainOptions, plan: Plan, dest: Path) -> Path:
    """Run the init pipeline for a lora-ga run without --artifact; the artifact goes to ``dest``."""
    try:
        from .distributed import InitOptions, run_init
    except ImportError:
        run_init = None
    if run_init is not None:
        wanted = dict(
            model=opts.model, data=opts.data, out=str(dest), num_samples=opts.init_samples, batch_size=opts.init_batch_size,
            max_rank=opts.rank, workers=opts.workers, gpus_per_worker=opts.gpus_per_worker, seed=opts.seed,
            max_length=opts.max_length, split="train", task=plan.task, text_column=opts.text_column,
            label_column=opts.label_column, prompt_column=opts.prompt_column, response_column=opts.response_column,
            target_modules=opts.target_modules, address=opts.address, progress=True,
        )
        names = {f.name for f in dataclasses.fields(InitOptions)}
        try:
            run_init(InitOptions(**{k: v for k, v in wanted.items() if k in names}))
            return dest
        except NotImplementedError:
            log.warning("the distributed init is not available yet: estimating on the driver instead.")
    # Stand-in until the distributed init exists: the single-process estimate on the driver.
    from .data import Encoder, iter_batches, sample_table, table_fingerprint
    from .estimate import estimate_init
    from .models import load_model, load_tokenizer

    model = load_model(plan.spec, task=plan.task, num_labels=plan.num_labels, seed=opts.seed)
    tokenizer = load_tokenizer(plan.spec)
    sample = sample_table(plan.train_table, opts.init_samples, opts.seed)
    batches = iter_batches(sample, Encoder(tokenizer, plan.task, opts.max_length), opts.init_batch_size, tokenizer.pad_token_id, plan.task)
    art = estimate_init(model, batches, target_modules=opts.target_modules, max_rank=opts.rank, seed=opts.seed,
                        base_model=opts.model, dataset_fingerprint=table_fingerprint(sample), progress=True,
                        total=sample.num_rows)
    art.save(dest)
    return dest


def export_run(opts: TrainOptions, result, out: Path, mlflow_run_id: str | None, tracking_uri: str | None,
               started: float | None = None) -> dict:
    """From the last checkpoint of a finished (or stopped) run, write ``out``: adapter/ or model/,
    metrics.json and loss_curve.png; log them to MLflow. Returns the metrics."""
    from . import tracking
    from .plots import plot_loss_curve

    checkpoint = result.checkpoint
    if checkpoint is None:
        raise RuntimeError(f"the run reported no checkpoint; nothing to export (storage: {getattr(result, 'path', '?')}).")
    out.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as d:
        d = Path(d)
        state = json.loads((d / STATE_FILE).read_text())
        done = bool(state.get("done"))
        kind = "model" if opts.init == "full" else "adapter"
        if done:
            _atomic_copytree(d / EXPORT_DIR / kind, out / kind)
    history = state["history"]
    final = dict(history[-1]) if history else {}
    for h in reversed(history):  # the latest eval, if the last step had none
        for k, v in h.items():
            if k.startswith("eval_") and k not in final:
                final[k] = v
    final["done"] = done
    summary = {
        "final": final,
        "history": history,
        "run": {
            "init": opts.init, "model": opts.model, "data": opts.data, "total_steps": state.get("total_steps"),
            "steps": state.get("step"), "wall_s": round(time.time() - started, 2) if started else None,
            "output": str(out / kind) if done else None, "checkpoint": checkpoint.path,
            "mlflow_run_id": mlflow_run_id, "tracking_uri": tracking_uri,
        },
    }
    _write_json(out / METRICS_FILE, summary)
    plot_loss_curve(history, out / LOSS_CURVE_FILE, title=f"{opts.init} r={opts.rank} lr={opts.lr:g} on {Path(str(opts.data)).name}")
    if mlflow_run_id and tracking_uri:
        tracking.log_artifacts(tracking_uri, mlflow_run_id, out / LOSS_CURVE_FILE)
        tracking.log_artifacts(tracking_uri, mlflow_run_id, out / METRICS_FILE)
        if done and kind == "adapter":
            tracking.log_artifacts(tracking_uri, mlflow_run_id, out / kind, kind)
        tracking.set_status(tracking_uri, mlflow_run_id, "FINISHED" if done else "KILLED")
    return dict(final, history=history, out=str(out), mlflow_run_id=mlflow_run_id, tracking_uri=tracking_uri,
                wall_s=summary["run"]["wall_s"])


def fit(opts: TrainOptions) -> dict:
    """Check, (estimate the init,) train, export and record one run; returns the final metrics
    (plus ``history``, ``out``, ``mlflow_run_id``)."""
    from . import tracking
    from .cluster import connect

    started = time.time()
    validate_options(opts)
    out = Path(opts.out).expanduser().resolve()
    opts = dataclasses.replace(opts, out=str(out))
    saved = _check_out_folder(opts, out)
    if saved is not None and opts.init == "lora-ga" and opts.artifact is None:
        kept = out / INIT_ARTIFACT_DIR
        if (kept / "meta.json").exists():
            opts = dataclasses.replace(opts, artifact=str(kept))
    if opts.artifact:
        opts = dataclasses.replace(opts, artifact=str(Path(opts.artifact).expanduser().resolve()))
    plan = plan_run(opts)
    if opts.init == "lora-ga" and opts.artifact:
        check_artifact(opts, plan)

    local = not (opts.address or os.environ.get("RAY_ADDRESS"))
    want_cpus = max(os.cpu_count() or 1, int(math.ceil(opts.workers * opts.cpus_per_worker)) + 2) if local else None
    connect(opts.address, num_cpus=want_cpus)
    resources = plan_resources(opts)

    tracking_uri = opts.tracking_uri or tracking.default_tracking_uri(out)
    if opts.tracking_uri:  # fails early with a clear message, before anything is written
        tracking.open_experiment(tracking_uri, opts.experiment)
    out.mkdir(parents=True, exist_ok=True)
    if not opts.tracking_uri:
        tracking.open_experiment(tracking_uri, opts.experiment)
    opts = dataclasses.replace(opts, tracking_uri=tracking_uri)

    run_info = json.loads((out / RUN_FILE).read_text()) if saved is not None and (out / RUN_FILE).exists() else {}
    estimated = False
    if opts.init == "lora-ga" and not opts.artifact:
        dest = out / INIT_ARTIFACT_DIR
        log.info("no --artifact: estimating the LoRA-GA init (%d samples) into %s", opts.init_samples, dest)
        estimate_artifact(opts, plan, dest)
        opts = dataclasses.replace(opts, artifact=str(dest))
        check_artifact_shapes(opts, plan, meta_model(plan.spec, plan.task, plan.num_labels))
        estimated = True
    if saved is None:
        _write_json(out / OPTIONS_FILE, dict(asdict(opts), artifact=None if estimated else opts.artifact))

    run_id = run_info.get("mlflow_run_id") if run_info.get("tracking_uri") == tracking_uri else None
    if run_id is None:
        run_id = create_mlflow_run(opts, tracking_uri, plan)
        _write_json(out / RUN_FILE, {"mlflow_run_id": run_id, "tracking_uri": tracking_uri})
        if opts.init == "lora-ga":
            tracking.log_init_artifact(tracking_uri, run_id, opts.artifact, out / ".plots")
            shutil.copy2(out / ".plots" / "singular_values.png", out / "singular_values.png")
            shutil.rmtree(out / ".plots", ignore_errors=True)
    else:
        tracking.set_status(tracking_uri, run_id, "RUNNING")

    trainer = build_trainer(opts, name=RAY_RUN_NAME, storage_path=str(out / RAY_DIR), mlflow_run_id=run_id,
                            plan=plan, resources=resources)
    log.info("training: init %s, %d steps of %d examples on %d worker(s) (%s), eval on %s; checkpoints in %s",
             opts.init, plan.total_steps, opts.batch_size, opts.workers, "CUDA" if resources.cuda else "CPU",
             plan.eval_source, out / RAY_DIR)
    try:
        result = trainer.fit()
    except BaseException as e:
        tracking.set_status(tracking_uri, run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        if isinstance(e, KeyboardInterrupt):
            raise
        raise RuntimeError(f"training failed: {e}\nFix the cause, then continue with --resume --out {out} "
                           "(from the last checkpoint, if any).") from e
    return export_run(opts, result, out, run_id, tracking_uri, started)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    d = TrainOptions.__dataclass_fields__
    S = None  # every option defaults to None here so --resume can tell what was given
    g = p.add_argument_group("what to train")
    g.add_argument("--model", default=S, help="demo-minilm, demo-smollm2, a local HF folder or .gguf file (required unless --resume)")
    g.add_argument("--data", default=S, help="demo-rotten-tomatoes, demo-arithmetic, or a local file/folder (required unless --resume)")
    g.add_argument("--out", required=True, help="output folder: adapter/ or model/, metrics.json, loss_curve.png, mlflow.db, checkpoints")
    g.add_argument("--init", default=S, help=f"one of {', '.join(INITS)} (default {d['init'].default})")
    g.add_argument("--artifact", default=S, help="LoRA-GA init artifact folder (from `loraga-ray init`); without it, lora-ga estimates one into OUT/init_artifact")
    g.add_argument("--task", default=S, choices=("seq-cls", "causal-lm"))
    for c in ("text", "label", "prompt", "response"):
        g.add_argument(f"--{c}-column", default=S, help=f"name of the {c} column in the data")
    g.add_argument("--target-modules", nargs="+", default=S, help="Linear layer names or suffixes to adapt (default: all Linears but the head)")
    g = p.add_argument_group("adapter")
    g.add_argument("--rank", type=int, default=S, help=f"LoRA rank (default {d['rank'].default})")
    g.add_argument("--alpha", type=float, default=S, help=f"LoRA alpha (default {d['alpha'].default})")
    g.add_argument("--gamma", type=float, default=S, help=f"gamma of the stable scale (default {d['gamma'].default})")
    g.add_argument("--direction", default=S, help=f"LoRA-GA direction: {', '.join(DIRECTIONS)} (default ArB2r)")
    g.add_argument("--scale", default=S, help=f"LoRA-GA scale: {', '.join(SCALES)} (default stable)")
    g.add_argument("--no-rslora", dest="use_rslora", action="store_false", default=S, help="scale adapters by alpha/r instead of alpha/sqrt(r)")
    g.add_argument("--lora-dropout", type=float, default=S)
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=S, help=f"peak learning rate (default {d['lr'].default})")
    g.add_argument("--max-steps", type=int, default=S, help=f"optimizer steps (default {d['max_steps'].default})")
    g.add_argument("--epochs", type=float, default=S, help="train for this many epochs instead of --max-steps")
    g.add_argument("--batch-size", type=int, default=S, help=f"global batch size, split over the workers (default {d['batch_size'].default})")
    g.add_argument("--warmup-ratio", type=float, default=S, help=f"(default {d['warmup_ratio'].default})")
    g.add_argument("--weight-decay", type=float, default=S)
    g.add_argument("--max-grad-norm", type=float, default=S, help="gradient clipping (0: off; default 1.0)")
    g.add_argument("--max-length", type=int, default=S, help=f"tokens per example (default {d['max_length'].default})")
    g.add_argument("--seed", type=int, default=S)
    g.add_argument("--eval-every", type=int, default=S, help=f"evaluate every K steps and at the end (default {d['eval_every'].default})")
    g.add_argument("--eval-samples", type=int, default=S, help="cap on evaluation examples (default: the whole split)")
    g.add_argument("--checkpoint-every", type=int, default=S, help="checkpoint every K steps (default: at every eval)")
    g.add_argument("--init-samples", type=int, default=S, help=f"examples for the LoRA-GA gradient estimate (default {d['init_samples'].default})")
    g.add_argument("--init-batch-size", type=int, default=S)
    g = p.add_argument_group("cluster and tracking")
    g.add_argument("--workers", type=int, default=S, help="Ray Train workers (DDP)")
    g.add_argument("--gpus-per-worker", type=float, default=S, help="GPUs per worker (default: 1 when the cluster has GPUs)")
    g.add_argument("--cpus-per-worker", type=float, default=S, help="CPUs per worker (default 1)")
    g.add_argument("--device", default=S, choices=DEVICES)
    g.add_argument("--address", default=S, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    g.add_argument("--tracking-uri", default=S, help="MLflow tracking URI (default sqlite:///OUT/mlflow.db)")
    g.add_argument("--experiment", default=S, help="MLflow experiment name (default loraga-ray)")
    g.add_argument("--parent-run-id", default=S, help="make this run a child of that MLflow run")
    g.add_argument("--run-name", default=S, help="MLflow run name")
    g.add_argument("--report-every", type=int, default=S, help="report to Ray (and Tune) every N steps (default: at evals, checkpoints and every ~2 s)")
    g.add_argument("--resume", action="store_true", help="continue the stopped run in --out from its last checkpoint")
    g.add_argument("--stop-after", type=int, default=S, help="stop after this many steps with a checkpoint (continue with --resume)")


def options_from_args(args) -> TrainOptions:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainOptions)
             if getattr(args, f.name, None) is not None and f.name != "resume"}
    resume = bool(getattr(args, "resume", False))
    if resume:
        saved_file = Path(args.out).expanduser() / OPTIONS_FILE
        if not saved_file.exists():
            raise ValueError(f"--resume: {args.out} holds no training run to continue (no {OPTIONS_FILE}).")
        saved = json.loads(saved_file.read_text())
        saved.pop("resume", None)
        merged = {k: v for k, v in saved.items() if k in TrainOptions.__dataclass_fields__}
        for k in ("stop_after", "address"):
            merged.pop(k, None)  # not part of the saved run: take them from this command line
        merged.update(given)
        return TrainOptions(**dict(merged, resume=True))
    missing = [f"--{k}" for k in ("model", "data") if k not in given]
    if missing:
        raise ValueError(f"loraga-ray train needs {' and '.join(missing)} (or --resume with --out of a stopped run).")
    if "epochs" in given and "max_steps" in given:
        raise ValueError("pass --max-steps or --epochs, not both.")
    if "epochs" in given:
        given["max_steps"] = None
    return TrainOptions(**given)


def run(args) -> int:
    opts = options_from_args(args)
    metrics = fit(opts)
    keys = [k for k in ("step", "train_loss", "eval_loss", "eval_accuracy", "eval_exact_match", "wall_s") if k in metrics]
    print(json.dumps({k: metrics[k] for k in keys}))
    print(f"output: {metrics['out']}")
    if metrics.get("mlflow_run_id"):
        print(f"mlflow run {metrics['mlflow_run_id']} in {metrics['tracking_uri']}")
    return 0 if metrics.get("done") else 3
