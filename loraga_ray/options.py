"""The typed options of the three jobs: :class:`InitOptions` (``loraga-ray init``),
:class:`TrainOptions` (``loraga-ray train``, and the base options of a search) and
:class:`SearchOptions` (``loraga-ray tune``).

Each field is documented once, in its ``help`` metadata; the command line is generated from the
same fields (:mod:`loraga_ray.cli.common`), so a flag and its API field cannot drift apart. Each
class validates itself in one place (``validate()``), before anything is loaded.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from .core.factors import DIRECTIONS, LORA_GA_GAMMA, LORA_ONE_GAMMA, SCALES, SVD_METHODS

INITS = ("lora-ga", "lora", "pissa", "full", "peft-lora-ga", "lora-one")
ARTIFACT_INITS = ("lora-ga", "lora-one")  # the inits built from an init artifact (one serves both)


def gradient_directions(init: str) -> int:
    """Singular directions per unit of rank: LoRA-GA (ours and PEFT's) splits the top 2r between
    A and B; LoRA-One, like LoRA and PiSSA, uses r."""
    return 2 if init in ("lora-ga", "peft-lora-ga") else 1


def artifact_max_rank(init: str, rank: int) -> int:
    """The ``max_rank`` an init artifact needs for ``--init init --rank rank`` (it holds 2*max_rank
    singular triplets per layer: LoRA-GA rank r takes 2r of them, LoRA-One r)."""
    return rank if gradient_directions(init) == 2 else -(-rank // 2)
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
INIT_STRATEGIES = ("auto", "replicated", "sharded")
TRAIN_STRATEGIES = ("auto", "ddp", "fsdp")
TRAIN_DTYPES = ("auto",) + DTYPES
TASK_CHOICES = ("seq-cls", "causal-lm")
COLUMN_FIELDS = ("text_column", "label_column", "prompt_column", "response_column")
INIT_WORKER_CPUS = 0.25  # logical CPUs a gradient worker reserves: Ray Data's tasks need the rest
HEAD_WARMUP_LR = 1e-3  # the head-first fit's lr (a linear probe on frozen features)
HEAD_WARMUP_HELP = ("fit a new classifier head alone (every other weight frozen) for N steps on the estimate's sample, in "
                    "its batches, before the gradient is taken (LoRA-GA, LoRA-One: the artifact carries that head) or "
                    "before any other init (LoRA then is LP-FT); 0: off")


def opt(default: Any = MISSING, help: str = "", **cli: Any):
    """A dataclass field with its one piece of documentation (``help``) and command-line hints
    (``choices``, ``flag``, ``aliases``, ``negate``: see :func:`loraga_ray.cli.common.add_option`)."""
    kwargs = {"metadata": dict(cli, help=help)}
    if isinstance(default, list):
        kwargs["default_factory"] = lambda: list(default)
    elif default is not MISSING:
        kwargs["default"] = default
    return field(**kwargs)


def column_kwargs(opts) -> dict[str, str | None]:
    """The four column options of any options object (or dict), as ``load_split`` takes them."""
    get = opts.get if isinstance(opts, dict) else (lambda k: getattr(opts, k, None))
    return {k: get(k) for k in COLUMN_FIELDS}


def load_kwargs(opts) -> dict:
    """``load_split``'s keywords of a run: the column options and ``task``."""
    return dict(column_kwargs(opts), task=getattr(opts, "task", None))


def split_names(value) -> list[str] | None:
    """``--target-modules`` as given: a list, or comma-separated names; None or empty: None."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    names = [n.strip() for item in items for n in str(item).split(",") if n.strip()]
    return names or None


def _positive_int(name: str, value, flag: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{flag or '--' + name.replace('_', '-')} must be a positive integer, got {value!r}.")


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {value!r}.")


def check_head_warmup(steps, lr, init_strategy: str) -> None:
    """--head-warmup-steps / --head-warmup-lr, for init and train alike."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"--head-warmup-steps must be an integer >= 0, got {steps!r}.")
    _positive("head_warmup_lr", lr)
    if steps and init_strategy == "sharded":
        raise ValueError("--head-warmup-steps fits the head on one gradient worker that holds the whole model; it "
                         "does not run with --init-strategy sharded. Drop one of them.")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown --{name.replace('_', '-')} {value!r}: use one of {', '.join(choices)}.")


# ---------------------------------------------------------------------------------------------
# init
# ---------------------------------------------------------------------------------------------


@dataclass
class InitOptions:
    """Everything ``loraga-ray init`` needs: the distributed gradient estimate and its SVD."""

    model: str = opt(help="demo-minilm, demo-smollm2, or a local Hugging Face model folder / .gguf file")
    data: str = opt(help="demo-rotten-tomatoes, demo-arithmetic, a local .parquet/.jsonl/.csv file or folder, "
                         "a save_to_disk folder, or an s3:// / gs:// parquet, jsonl or csv location")
    out: str | None = opt(None, "where the artifact goes: a local folder, s3://bucket/prefix or gs://bucket/prefix")
    overwrite: bool = opt(False, "replace an init artifact already at --out (kept until the new one is complete); "
                                 "anything else there is never touched")
    num_samples: int = opt(256, "examples in the gradient estimate", flag="--init-samples", aliases=("--num-samples",))
    batch_size: int = opt(8, "examples per forward/backward pass of the estimate")
    max_rank: int = opt(32, "largest LoRA rank the artifact serves; it keeps 2 x max_rank singular triplets")
    workers: int = opt(1, "gradient workers (Ray actors)")
    init_strategy: str = opt("auto", "replicated: every worker holds the whole model; sharded: FSDP2 over the workers, "
                                     "each holds 1/N of the weights and gradient sums, the SVD runs on the shards; "
                                     "auto: replicated if it fits the workers' memory, else sharded",
                             choices=INIT_STRATEGIES)
    gpus_per_worker: float | None = opt(None, "GPUs per worker (default: 1 if the cluster has GPUs now, else 0 = CPU); "
                                              "pass 1 on an autoscaling cluster whose GPU nodes start at zero")
    seed: int = opt(0, "sampling seed (and the seed of a new classifier head)")
    svd: str = opt("randomized", "truncated SVD method", choices=SVD_METHODS)
    max_length: int = opt(128, "tokens per example after truncation")
    split: str = opt("train", "dataset split to sample")
    task: str | None = opt(None, "seq-cls or causal-lm (default: from the data's columns and the model's config)",
                           choices=TASK_CHOICES)
    text_column: str | None = opt(None, "seq-cls text column (default text)")
    label_column: str | None = opt(None, "seq-cls label column (default label)")
    prompt_column: str | None = opt(None, "causal-lm prompt column (default prompt)")
    response_column: str | None = opt(None, "causal-lm response column (default response)")
    target_modules: list[str] | None = opt(None, "Linear layer names or suffixes to adapt, space- or comma-separated "
                                                 "(default: every Linear but the output head)")
    address: str | None = opt(None, "Ray cluster to join (default: RAY_ADDRESS, else an embedded local Ray)")
    progress: bool = opt(True, "show progress bars (--no-progress: none)", negate="--no-progress")
    cpus_per_worker: float = opt(INIT_WORKER_CPUS, "logical CPUs each gradient worker reserves (Ray Data's tasks use the rest)")
    dtype: str = opt("float32", "model dtype on the workers (bfloat16 halves GPU memory; the sums stay float32)",
                     choices=DTYPES)
    num_labels: int | None = opt(None, "seq-cls classes (default: largest label + 1, at least 2)")
    max_retries: int = opt(1, "rerun the gradient stage this often if a worker dies or hangs")
    stall_timeout: float = opt(300.0, "seconds a gradient worker may go without finishing a batch before it counts as "
                                      "lost (stuck): its stage is rerun, or the run fails")
    resource_timeout: float | None = opt(None, "seconds to wait for the workers' resources (default 60 on a local Ray, "
                                               "600 on a joined cluster)")
    allow_pickle_weights: bool = opt(False, "also load weights stored as a pickle (pytorch_model.bin), which can run "
                                            "code when loaded: only for files you trust")
    head_warmup_steps: int = opt(0, "fit a new classifier head alone (every other weight frozen) for N AdamW steps on "
                                    "the sample, in its batches, before the gradient is taken; the artifact carries "
                                    "that head, and runs from it must ask for the same warm-up; 0: off")
    head_warmup_lr: float = opt(HEAD_WARMUP_LR, "constant AdamW learning rate of --head-warmup-steps")

    def validate(self) -> None:
        """Raise ValueError for settings that cannot work, before anything expensive starts."""
        check_head_warmup(self.head_warmup_steps, self.head_warmup_lr, self.init_strategy)
        if self.head_warmup_steps and self.task == "causal-lm":
            raise ValueError("--head-warmup-steps fits a new classifier head; a causal LM has none. Drop it.")
        for name in ("num_samples", "batch_size", "max_rank", "workers"):
            _positive_int(name, getattr(self, name), flag={"num_samples": "--init-samples"}.get(name))
        _choice("svd", self.svd, SVD_METHODS)
        _choice("init_strategy", self.init_strategy, INIT_STRATEGIES)
        _choice("dtype", self.dtype, DTYPES)
        if self.task is not None:
            _choice("task", self.task, TASK_CHOICES)
        if self.max_length < 2:
            raise ValueError(f"--max-length must be at least 2, got {self.max_length}.")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ValueError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}.")
        if not self.cpus_per_worker > 0:
            raise ValueError(f"--cpus-per-worker must be > 0, got {self.cpus_per_worker}.")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"--max-retries must be an integer >= 0, got {self.max_retries!r}.")
        if self.num_labels is not None:
            _positive_int("num_labels", self.num_labels)
        _positive("stall_timeout", self.stall_timeout)
        if self.resource_timeout is not None and not self.resource_timeout > 0:
            raise ValueError(f"--resource-timeout must be positive, got {self.resource_timeout}.")
        self.target_modules = split_names(self.target_modules)


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------

# Options that define a run: a resumed run must keep them (data order, schedule, model).
RUN_DEFINING = (
    "model", "data", "init", "rank", "alpha", "gamma", "direction", "scale", "use_rslora", "lr",
    "max_steps", "epochs", "batch_size", "warmup_ratio", "weight_decay", "max_grad_norm", "workers",
    "eval_every", "eval_samples", "checkpoint_every", "max_length", "seed", "target_modules",
    "init_samples", "init_batch_size", "task", "text_column", "label_column", "prompt_column",
    "response_column", "lora_dropout", "dtype", "head_lr", "eval_early_every", "eval_early_until",
    "head_warmup_steps", "head_warmup_lr",
)


@dataclass
class TrainOptions:
    """One fine-tuning run (and, in a search, the values the space does not set).
    ``batch_size`` is global: examples per optimizer step, split over the workers."""

    model: str = opt(help="demo-minilm, demo-smollm2, a local HF folder or .gguf file")
    data: str = opt(help="demo-rotten-tomatoes, demo-arithmetic, or a local file/folder")
    out: str = opt(help="output folder: adapter/ or model/, metrics.json, loss_curve.png, mlflow.db, checkpoints")
    init: str = opt("lora-ga", "adapter initialisation: lora-ga (ours), lora, pissa, peft-lora-ga (PEFT's built-in "
                               "LoRA-GA), lora-one (LoRA-One, from the same artifact) or full (full fine-tuning)",
                    choices=INITS)
    artifact: str | None = opt(None, "init artifact folder (from `loraga-ray init`) for lora-ga or lora-one; without "
                                     "it, they estimate one first (into OUT/init_artifact for train)")
    rank: int = opt(8, "LoRA rank r")
    alpha: float = opt(16.0, "LoRA alpha")
    gamma: float | None = opt(None, "gamma of the stable scale: LoRA-GA's c = d_out^(1/4) / sqrt(gamma) (default "
                                    f"{LORA_GA_GAMMA:g}, the paper's), LoRA-One's 1 / sqrt(gamma * s_1) (default "
                                    f"{LORA_ONE_GAMMA:g}, its authors')")
    direction: str = opt("ArB2r", "which singular directions of G go to A0 and B0", choices=DIRECTIONS)
    scale: str = opt("stable", "scale rule of A0 and B0", choices=SCALES)
    use_rslora: bool = opt(True, "scale adapters by alpha/sqrt(r) (rsLoRA); --no-rslora: alpha/r", negate="--no-rslora")
    lr: float = opt(2e-4, "peak learning rate")
    head_lr: float | None = opt(None, "peak learning rate of a new classifier head (trained in full beside the "
                                      "adapter; the same warm-up and decay). Default: --lr")
    max_steps: int | None = opt(200, "optimizer steps")
    epochs: float | None = opt(None, "train for this many epochs instead of --max-steps")
    batch_size: int = opt(16, "global batch size (examples per optimizer step), split over the workers")
    warmup_ratio: float = opt(0.05, "fraction of the steps with linear warm-up (then cosine decay)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping (0: off)")
    workers: int = opt(1, "Ray Train workers (DDP)")
    gpus_per_worker: float | None = opt(None, "GPUs per worker (default: 1 when the cluster has GPUs)")
    cpus_per_worker: float = opt(1.0, "CPUs per Train worker (on CPU also its compute threads)")
    eval_every: int = opt(50, "evaluate every K steps and at the end")
    eval_samples: int | None = opt(None, "cap on evaluation examples (default: the whole validation split)")
    eval_early_every: int | None = opt(None, "also evaluate every K steps over the first --eval-early-until steps, so "
                                             "early convergence shows in the eval curve")
    eval_early_until: int = opt(40, "the steps that --eval-early-every covers")
    checkpoint_every: int | None = opt(None, "checkpoint every K steps (default: at every evaluation)")
    max_length: int = opt(128, "tokens per example")
    seed: int = opt(0, "seed of the data order, a new head and the adapter init")
    target_modules: list[str] | None = opt(None, "Linear layer names or suffixes to adapt, space- or comma-separated "
                                                 "(default: every Linear but the output head)")
    init_samples: int = opt(256, "examples in the LoRA-GA gradient estimate (when it runs)")
    init_batch_size: int = opt(8, "examples per forward/backward pass of the gradient estimate")
    init_workers: int | None = opt(None, "gradient workers of the estimate (default: --workers)")
    init_svd: str = opt("randomized", "truncated SVD method of the estimate", choices=SVD_METHODS)
    init_strategy: str = opt("auto", "how the estimate holds the model: replicated, sharded (FSDP2 over the gradient "
                                     "workers) or auto (the planner's pick)", choices=INIT_STRATEGIES)
    train_strategy: str = opt("auto", "how the Train workers hold the model: ddp (each holds the whole base), fsdp "
                                      "(FSDP2 over the workers, one unit per transformer block: each holds 1/N of it) "
                                      "or auto (ddp when the planner says it fits the GPUs, else fsdp; ddp on CPU)",
                              choices=TRAIN_STRATEGIES)
    dtype: str = opt("auto", "dtype of the frozen base weights: auto (float32 on CPU, bfloat16 on CUDA, float16 on GPUs "
                             "without bfloat16), bfloat16, float16 or float32. LoRA factors, trained heads and their AdamW "
                             "state stay float32; the forward runs under autocast in this dtype", choices=TRAIN_DTYPES)
    activation_checkpointing: bool = opt(False, "recompute each transformer block's activations in the backward instead "
                                                "of keeping them (much less memory, about a third more compute)")
    task: str | None = opt(None, "seq-cls or causal-lm (default: from the data's columns)", choices=TASK_CHOICES)
    text_column: str | None = opt(None, "seq-cls text column (default text)")
    label_column: str | None = opt(None, "seq-cls label column (default label)")
    prompt_column: str | None = opt(None, "causal-lm prompt column (default prompt)")
    response_column: str | None = opt(None, "causal-lm response column (default response)")
    tracking_uri: str | None = opt(None, "MLflow tracking URI (default sqlite:///OUT/mlflow.db)")
    experiment: str = opt("loraga-ray", "MLflow experiment name")
    parent_run_id: str | None = opt(None, "make this run a child of that MLflow run")
    run_name: str | None = opt(None, "MLflow run name")
    resume: bool = opt(False, "continue the stopped run in --out from its last checkpoint")
    overwrite: bool = opt(False, "replace the training run already in --out (it is kept, moved aside, until the new run "
                                 "ends well; a run that fails puts it back); anything else there is never touched")
    stop_after: int | None = opt(None, "stop after this many steps with a checkpoint (continue with --resume)")
    report_every: int | None = opt(None, "report to Ray (and Tune) every N steps (default: at evaluations, "
                                         "checkpoints and every ~2 s)")
    address: str | None = opt(None, "Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    device: str = opt("auto", "auto, cpu or cuda", choices=DEVICES)
    stall_timeout: float = opt(300.0, "seconds a Train worker may go without finishing a step (its watchdog then ends "
                                      "it) or leave Ray Train's health check unanswered (a stopped process) before it "
                                      "counts as lost: restarted from the last checkpoint (--max-failures) or a clear "
                                      "error; the first step gets 300 s more")
    max_failures: int | None = opt(None, "times the Train workers restart from the last checkpoint after one is lost "
                                         "(default: 1 on a joined cluster, 0 on an embedded Ray)")
    lora_dropout: float = opt(0.0, "dropout on the LoRA path")
    allow_pickle_weights: bool = opt(False, "also load weights stored as a pickle (pytorch_model.bin), which can run "
                                            "code when loaded: only for files you trust")
    head_warmup_steps: int = opt(0, HEAD_WARMUP_HELP)
    head_warmup_lr: float = opt(HEAD_WARMUP_LR, "constant AdamW learning rate of --head-warmup-steps")

    @property
    def stable_gamma(self) -> float:
        """--gamma, or the default of the method it scales (LoRA-One's authors use 128, LoRA-GA's paper 16)."""
        if self.gamma is not None:
            return float(self.gamma)
        return LORA_ONE_GAMMA if self.init == "lora-one" else LORA_GA_GAMMA

    def validate(self) -> None:
        """Raise ValueError for options that cannot work, before anything is loaded."""
        _choice("init", self.init, INITS)
        check_head_warmup(self.head_warmup_steps, self.head_warmup_lr, self.init_strategy)
        check_overwrite(self.overwrite, self.resume, self.out, self.artifact)
        if self.artifact is not None and self.init not in ARTIFACT_INITS:
            raise ValueError(f"--artifact is an init artifact for lora-ga or lora-one; it does not apply to --init "
                             f"{self.init}. Drop it or use --init lora-ga / lora-one.")
        _choice("direction", self.direction, DIRECTIONS)
        _choice("scale", self.scale, SCALES)
        _choice("device", self.device, DEVICES)
        _choice("init_svd", self.init_svd, SVD_METHODS)
        _choice("init_strategy", self.init_strategy, INIT_STRATEGIES)
        _choice("train_strategy", self.train_strategy, TRAIN_STRATEGIES)
        _choice("dtype", self.dtype, TRAIN_DTYPES)
        if self.task is not None:
            _choice("task", self.task, TASK_CHOICES)
        _positive_int("rank", self.rank)
        for name in ("alpha", "lr"):
            _positive(name, getattr(self, name))
        for name in ("gamma", "head_lr"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        _positive_int("workers", self.workers)
        _positive_int("batch_size", self.batch_size)
        if self.batch_size % self.workers:
            raise ValueError(f"--batch-size {self.batch_size} is the global batch and must be a multiple of --workers "
                             f"{self.workers} (each worker takes batch_size / workers examples per step).")
        if self.epochs is None:
            if self.max_steps is None or self.max_steps < 1:
                raise ValueError(f"--max-steps must be a positive integer (or pass --epochs), got {self.max_steps!r}.")
        elif not self.epochs > 0:
            raise ValueError(f"--epochs must be positive, got {self.epochs!r}.")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}.")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError("--weight-decay and --max-grad-norm must be >= 0 and --lora-dropout in [0, 1).")
        if self.eval_every < 1 or (self.checkpoint_every is not None and self.checkpoint_every < 1):
            raise ValueError("--eval-every and --checkpoint-every must be positive.")
        if self.eval_samples is not None and self.eval_samples < 1:
            raise ValueError(f"--eval-samples must be positive, got {self.eval_samples}.")
        if self.eval_early_every is not None:
            _positive_int("eval_early_every", self.eval_early_every)
            _positive_int("eval_early_until", self.eval_early_until)
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ValueError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}.")
        if self.device == "cpu" and self.gpus_per_worker:
            raise ValueError("--device cpu with --gpus-per-worker > 0: drop one of them.")
        if self.cpus_per_worker < 0:
            raise ValueError(f"--cpus-per-worker must be >= 0, got {self.cpus_per_worker}.")
        if self.max_length < 2:
            raise ValueError(f"--max-length must be at least 2, got {self.max_length}.")
        if self.init_samples < 1 or self.init_batch_size < 1:
            raise ValueError("--init-samples and --init-batch-size must be positive.")
        if self.init_workers is not None:
            _positive_int("init_workers", self.init_workers)
        _positive("stall_timeout", self.stall_timeout)
        if self.max_failures is not None and (isinstance(self.max_failures, bool) or not isinstance(self.max_failures, int)
                                              or self.max_failures < 0):
            raise ValueError(f"--max-failures must be an integer >= 0, got {self.max_failures!r}.")
        if self.report_every is not None and self.report_every < 1:
            raise ValueError(f"--report-every must be positive, got {self.report_every}.")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"--stop-after must be positive, got {self.stop_after}.")
        self.target_modules = split_names(self.target_modules)

    def init_options(self, *, out: str | None, max_rank: int, task: str, num_labels: int | None,
                     progress: bool = True) -> InitOptions:
        """The options of the gradient estimate this run (or search) needs: the same model, data,
        columns, targets, seed, length and head size, so the artifact fits it. The one mapping
        from training options to init options (``train`` and ``tune`` both use it)."""
        gpus = 0.0 if self.device == "cpu" else self.gpus_per_worker
        return InitOptions(
            model=self.model, data=self.data, out=out, num_samples=self.init_samples, batch_size=self.init_batch_size,
            max_rank=max_rank, workers=self.init_workers or self.workers, gpus_per_worker=gpus, seed=self.seed,
            svd=self.init_svd, init_strategy=self.init_strategy, max_length=self.max_length, split="train", task=task,
            dtype=self.dtype if self.dtype != "auto" else "float32",
            target_modules=self.target_modules, address=self.address, progress=progress,
            allow_pickle_weights=self.allow_pickle_weights,
            head_warmup_steps=self.head_warmup_steps, head_warmup_lr=self.head_warmup_lr,
            num_labels=num_labels if task == "seq-cls" else None, **column_kwargs(self),
        )


def check_overwrite(overwrite: bool, resume: bool, out: str | None, artifact: str | None = None) -> None:
    """--overwrite replaces the output in --out; it cannot also continue it, nor read an artifact
    that lives inside the folder it moves aside."""
    if not overwrite:
        return
    if resume:
        raise ValueError("--overwrite and --resume contradict each other: --resume continues the run in --out, "
                         "--overwrite replaces it. Pass one of them.")
    if artifact and out:
        from pathlib import Path

        a, o = Path(artifact).expanduser().resolve(), Path(out).expanduser().resolve()
        if a == o or o in a.parents:
            raise ValueError(f"--artifact {artifact} lies inside --out {out}, which --overwrite replaces: copy the "
                             "artifact elsewhere first, or train into another --out.")


# ---------------------------------------------------------------------------------------------
# tune
# ---------------------------------------------------------------------------------------------


class SearchError(ValueError):
    """A search that cannot start (or resume) as asked."""


TRIAL_RUNNERS = ("auto", "ray-train", "in-process")


@dataclass
class SearchOptions:
    """How to search; the training options themselves are a :class:`TrainOptions`."""

    space: str | None = opt(None, "YAML search space (tune_spaces/rank.yaml, scaling.yaml, baselines.yaml or your own)")
    num_samples: int = opt(1, "Ray Tune samples of the space; grid values multiply", flag="--tune-samples",
                           aliases=("--num-samples",))
    max_concurrent: int = opt(1, "trials running at once")
    grace_period: int | None = opt(None, "ASHA: steps before a trial may be stopped (default 2 x --eval-every)")
    reduction_factor: int = opt(2, "ASHA: keep 1/factor of the trials at each rung")
    name: str = opt("search", "name of the Tune experiment (its folder under --out)")
    resume: bool = opt(False, "continue the interrupted search in --out (its saved options are used)")
    overwrite: bool = opt(False, "replace the search already in --out (kept, moved aside, until the new search ends "
                                 "well; one that fails puts it back)")
    trial_cpus: float = opt(0.1, "logical CPUs the Tune trial function itself reserves (an in-process trial also "
                                 "reserves its worker's --cpus-per-worker)")
    trial_runner: str = opt("auto", "how each trial trains: 'ray-train' (a Ray Train run per trial), 'in-process' (the "
                                    "training loop inside the Tune trial: one CPU worker only, no Train controller and "
                                    "worker to start per trial) or 'auto' (in-process for --workers 1 on CPU)",
                            choices=TRIAL_RUNNERS)

    def validate(self, base: TrainOptions) -> None:
        check_overwrite(self.overwrite, self.resume, base.out, base.artifact)
        for name in ("num_samples", "max_concurrent", "reduction_factor"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                flag = "--tune-samples" if name == "num_samples" else "--" + name.replace("_", "-")
                raise SearchError(f"{flag} must be a positive integer, got {value!r}.")
        if self.reduction_factor < 2:
            raise SearchError(f"--reduction-factor must be >= 2 (ASHA keeps 1/factor of the trials at each rung), "
                              f"got {self.reduction_factor}.")
        if self.trial_runner not in TRIAL_RUNNERS:
            raise SearchError(f"--trial-runner must be one of {', '.join(TRIAL_RUNNERS)}, got {self.trial_runner!r}.")
        if self.trial_runner == "in-process" and base.workers != 1:
            raise SearchError(f"--trial-runner in-process trains each trial inside its Tune trial, on one worker; "
                              f"--workers is {base.workers}. Use --trial-runner ray-train (or auto) for multi-worker trials.")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise SearchError(f"--name {self.name!r} must be a plain folder name.")
        if base.max_steps is None and base.epochs is None:
            raise SearchError("set --max-steps (or --epochs): ASHA needs a training length.")
        if self.grace_period is not None:
            if self.grace_period < 1:
                raise SearchError(f"--grace-period must be a positive number of steps, got {self.grace_period}.")
            if base.max_steps is not None and self.grace_period > base.max_steps:
                raise SearchError(f"--grace-period {self.grace_period} is longer than --max-steps {base.max_steps}; "
                                  "ASHA could never stop a trial.")
        if base.eval_every is None or base.eval_every < 1:
            raise SearchError("--eval-every must be a positive number of steps: the search ranks trials by eval_loss.")


def from_dict(cls, values: dict):
    """``cls(**values)`` keeping only the keys that are fields of ``cls`` (saved option files may
    hold keys of other versions)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------


@dataclass
class DemoOptions:
    """``loraga-ray demo``: LoRA-GA against plain LoRA, end to end. Unset values follow the demo
    model: the budget (steps, batch, length, evaluation) and learning rates at which the
    convergence benchmark chose them (see :func:`loraga_ray.jobs.demo.resolve_defaults`)."""

    model: str = opt("demo-minilm", "demo-minilm, demo-smollm2 or a local HF folder")
    data: str | None = opt(None, "default: demo-rotten-tomatoes for demo-minilm, demo-arithmetic for demo-smollm2")
    out: str = opt("runs/demo", "output folder")
    rank: int = opt(8, "LoRA rank r")
    alpha: float = opt(16.0, "LoRA alpha")
    max_steps: int | None = opt(None, "training steps per method (default: the benchmark's budget for --model)")
    batch_size: int | None = opt(None, "global batch size (default: the benchmark's)")
    eval_every: int | None = opt(None, "evaluate every K steps (default: every 5 over the first 40, and at the end)")
    eval_samples: int = opt(256, "validation examples evaluated during training")
    test_samples: int | None = opt(None, "cap on test examples (default: all for classification, 200 for generation)")
    init_samples: int = opt(256, "examples in the LoRA-GA gradient estimate", aliases=("--num-samples",))
    max_length: int | None = opt(None, "tokens per example (default: the benchmark's)")
    lr_lora_ga: float | None = opt(None, "LoRA-GA's learning rate (default: the benchmark's choice for --model)")
    lr_lora: float | None = opt(None, "LoRA's learning rate (default: the benchmark's choice for --model)")
    head_lr: float | None = opt(None, "learning rate of the new classifier head, for both methods (default: the "
                                      "benchmark's rule)")
    workers: int = opt(1, "gradient and training workers")
    seed: int = opt(0, "seed")
    verbose: bool = opt(False, "also show Ray's and transformers' own logs and warnings")
    address: str | None = opt(None, "Ray cluster address (default: an embedded local Ray)")
    tracking_uri: str | None = opt(None, "MLflow tracking URI (default: sqlite in --out)")
