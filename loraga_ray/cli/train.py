"""``loraga-ray train``: one fine-tuning run on Ray Train."""

from __future__ import annotations

import json
from pathlib import Path

from ..options import TrainOptions, from_dict
from .common import COLUMNS, add_option, add_options, given_values

HELP = "fine-tune with LoRA-GA, LoRA, PiSSA, PEFT's LoRA-GA or full fine-tuning on Ray Train"

WHAT = ("model", "data")
ADAPTER = ("rank", "alpha", "gamma", "direction", "scale", "use_rslora", "lora_dropout")
OPTIMISATION = ("lr", "head_lr", "head_warmup_steps", "head_warmup_lr", "max_steps", "epochs", "batch_size", "warmup_ratio", "weight_decay", "max_grad_norm",
                "max_length", "seed", "eval_every", "eval_samples", "eval_early_every",
                "eval_early_until")
INIT_STAGE = ("init_samples", "init_batch_size", "init_workers", "init_svd", "init_strategy")
CLUSTER = ("workers", "train_strategy", "dtype", "activation_checkpointing", "gpus_per_worker", "cpus_per_worker",
           "device", "address", "max_failures", "stall_timeout", "allow_pickle_weights")
TRACKING = ("tracking_uri", "experiment")


def add_train_groups(p, *, suppress_default: bool, skip: tuple = ()) -> None:
    """The flags of TrainOptions that ``train`` and ``tune`` share, in the same groups."""
    def group(title, names):
        g = p.add_argument_group(title)
        add_options(g, TrainOptions, [n for n in names if n not in skip], suppress_default=suppress_default)
        return g

    group("what to train", WHAT + ("init", "artifact") + COLUMNS + ("target_modules",))
    group("adapter", ADAPTER)
    group("optimisation", OPTIMISATION)
    group("the LoRA-GA gradient estimate (when the run makes one)", INIT_STAGE)
    group("cluster", CLUSTER)
    return group("tracking", TRACKING)


def add_arguments(p) -> None:
    # every option is left out of the namespace unless given, so --resume can tell given from saved
    add_option(p, TrainOptions, "out", required=True)
    g = add_train_groups(p, suppress_default=True)
    add_options(g, TrainOptions, ("parent_run_id", "run_name", "report_every", "checkpoint_every", "resume",
                                  "overwrite", "stop_after"), suppress_default=True)


def options_from_args(args) -> TrainOptions:
    """TrainOptions from the command line; with --resume, the saved options of the stopped run
    with the given ones on top (run-defining ones must match; ``fit`` checks)."""
    from ..jobs.run_folder import saved_options

    given = given_values(args, TrainOptions)
    given.pop("resume", None)
    if getattr(args, "resume", False):
        saved = saved_options(Path(args.out).expanduser())
        if saved is None:
            raise ValueError(f"--resume: {args.out} holds no training run to continue (no train_options.json).")
        for k in ("resume", "overwrite", "stop_after", "address"):
            saved.pop(k, None)  # not part of the saved run: taken from this command line
        return from_dict(TrainOptions, dict(saved, **given, resume=True))
    missing = [f"--{k}" for k in ("model", "data") if k not in given]
    if missing:
        raise ValueError(f"loraga-ray train needs {' and '.join(missing)} (or --resume with --out of a stopped run).")
    if "epochs" in given and "max_steps" in given:
        raise ValueError("pass --max-steps or --epochs, not both.")
    if "epochs" in given:
        given["max_steps"] = None
    return TrainOptions(**given)


def run(args) -> int:
    from ..jobs.train import fit

    metrics = fit(options_from_args(args))
    keys = [k for k in ("step", "train_loss", "eval_loss", "eval_accuracy", "eval_exact_match", "wall_s") if k in metrics]
    print(json.dumps({k: metrics[k] for k in keys}))
    print(f"output: {metrics['out']}")
    if metrics.get("mlflow_run_id"):
        print(f"mlflow run {metrics['mlflow_run_id']} in {metrics['tracking_uri']}")
    return 0 if metrics.get("done") else 3
