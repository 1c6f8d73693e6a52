"""``loraga-ray demo``: LoRA-GA against plain LoRA, end to end, on the embedded default.

1. estimate the LoRA-GA init with the distributed pipeline (Ray Data -> gradient workers -> SVD);
2. fine-tune LoRA-GA and plain LoRA with the same budget through Ray Train, both logged to MLflow;
3. evaluate each exported adapter on the test split, loaded onto a fresh, unmodified base;
4. print a table (test metric, steps to reach LoRA's final training loss, time) and write a PNG
   of both training-loss curves.

The budget (steps, batch, length, schedule, evaluation) and the learning rates are those at which
benchmarks/convergence.py chose the learning rates on the validation split, so the comparison is
made where its settings were tuned. Every run prints its steps as it goes; a run whose loss ends
above its start (or gives back most of its drop) is flagged "diverged / collapsed" rather than
given a steps-to-loss figure. Ray's and transformers' own logs stay out unless ``--verbose``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

from ..core.files import output_lock, write_json
from .run_folder import check_ours, claim
from ..options import DemoOptions, InitOptions, TrainOptions

log = logging.getLogger(__name__)

# The budget of each demo model, the one benchmarks/convergence.py trains at (it reads it from
# here): the demo's learning rates were chosen on validation under exactly these settings.
DEMO_BUDGETS = {"demo-minilm": dict(data="demo-rotten-tomatoes", max_steps=80, batch_size=16, max_length=64),
                "demo-smollm2": dict(data="demo-arithmetic", max_steps=60, batch_size=8, max_length=48)}
EARLY_EVERY, EARLY_UNTIL = 5, 40  # eval loss every 5 steps over the first 40, as in the benchmark

# Each method's learning rate (and the head rule) as benchmarks/convergence.py chose them on the
# validation split for that demo model at its budget (benchmarks/results/convergence_<exp>.md).
# Other models start from the demo-minilm values.
DEFAULT_LR = {"demo-minilm": {"lora-ga": 1e-4, "lora": 1e-3},
              "demo-smollm2": {"lora-ga": 3e-5, "lora": 1e-3}}
DEFAULT_HEAD_LR = {"demo-minilm": None}  # None: the head trains at each method's lr


def resolve_defaults(opts: DemoOptions) -> DemoOptions:
    """The demo model's data, budget and learning rates where ``opts`` leaves them unset."""
    lrs = DEFAULT_LR.get(opts.model, DEFAULT_LR["demo-minilm"])
    budget = DEMO_BUDGETS.get(opts.model, DEMO_BUDGETS["demo-minilm"])
    data = opts.data if opts.data is not None else budget["data"]
    max_steps = opts.max_steps if opts.max_steps is not None else budget["max_steps"]
    return dataclasses.replace(
        opts,
        data=data,
        max_steps=max_steps,
        batch_size=opts.batch_size if opts.batch_size is not None else budget["batch_size"],
        max_length=opts.max_length if opts.max_length is not None else budget["max_length"],
        eval_every=opts.eval_every if opts.eval_every is not None else max_steps,
        lr_lora_ga=opts.lr_lora_ga if opts.lr_lora_ga is not None else lrs["lora-ga"],
        lr_lora=opts.lr_lora if opts.lr_lora is not None else lrs["lora"],
        head_lr=opts.head_lr if opts.head_lr is not None else DEFAULT_HEAD_LR.get(opts.model),
    )


def run_demo(opts: DemoOptions) -> int:
    """The demo end to end into ``opts.out``; a rerun continues (or reuses) its own runs there."""
    args = resolve_defaults(opts)
    out = Path(args.out).expanduser().resolve()
    with output_lock(out):  # one demo per folder
        check_ours(out, "demo")  # a rerun continues its own runs; any other folder is left alone
        claim(out, "demo")
        return _demo(args, out)


def _demo(args: DemoOptions, out: Path) -> int:
    from ..curves import collapsed, final_train_loss, first_train_loss, steps_to_reach
    from ..models import resolve_model
    from ..plots import plot_method_curves
    from ..tracking import default_tracking_uri
    from ..training.evaluate import evaluate_split, load_finished
    from .cluster import connect
    from .init import run_init
    from .train import fit

    spec = resolve_model(args.model)  # a clear error (with the pip command) before Ray starts
    if not args.verbose:
        hush_driver()
    ray = connect(args.address, min_cpus=8, runtime_env=None if args.verbose else HUSHED_ENV,
                  logging_level=None if args.verbose else logging.ERROR)
    # one run at a time: its workers take the cores (not more threads than this machine has), one
    # CPU left for Ray Data
    cpus = float(max(1, min(int(ray.cluster_resources().get("CPU", 1)) - 1, os.cpu_count() or 1) // args.workers))
    tracking_uri = args.tracking_uri or default_tracking_uri(out)

    timings = {}
    print(f"[demo] LoRA-GA vs LoRA on {args.model} / {args.data}: {args.max_steps} steps of {args.batch_size} "
          f"(the budget the benchmark chose their learning rates at)", flush=True)
    print(f"[demo] 1/4 LoRA-GA gradient estimate: {args.init_samples} samples of {args.data}, {args.workers} worker(s)", flush=True)
    t0 = time.time()
    init_dir = out / "init"
    if (init_dir / "meta.json").exists():
        print(f"[demo]     reusing {init_dir}", flush=True)
        init_summary = {"reused": True}
    else:
        _, init_summary = run_init(InitOptions(
            model=args.model, data=args.data, out=str(init_dir), num_samples=args.init_samples, batch_size=8,
            max_rank=args.rank, workers=args.workers, seed=args.seed, max_length=args.max_length, address=args.address))
    timings["init_s"] = time.time() - t0

    results = {}
    for i, method in enumerate(("lora-ga", "lora"), start=2):
        lr = args.lr_lora_ga if method == "lora-ga" else args.lr_lora
        print(f"[demo] {i}/4 fine-tuning {method}: {args.max_steps} steps of {args.batch_size}, lr {lr:g}", flush=True)
        t0 = time.time()
        res = fit(TrainOptions(
            model=args.model, data=args.data, out=str(out / method), init=method,
            artifact=str(init_dir) if method == "lora-ga" else None, rank=args.rank, alpha=args.alpha, lr=lr,
            max_steps=args.max_steps, batch_size=args.batch_size, eval_every=args.eval_every,
            eval_early_every=EARLY_EVERY, eval_early_until=EARLY_UNTIL, head_lr=args.head_lr,
            cpus_per_worker=cpus,
            eval_samples=args.eval_samples, max_length=args.max_length, seed=args.seed, workers=args.workers,
            tracking_uri=tracking_uri, experiment="loraga-ray-demo", run_name=f"demo-{method}", address=args.address,
            resume=(out / method / "train_options.json").exists()))
        results[method] = {"train": res, "wall_s": time.time() - t0}

    print("[demo] 4/4 test-split evaluation of the exported adapters on a fresh base", flush=True)
    limit = args.test_samples if args.test_samples is not None else (None if spec.task == "seq-cls" else 200)
    for method, r in results.items():
        model, mspec = load_finished(args.model, out / method, seed=args.seed)
        r["test"] = evaluate_split(model, mspec, args.data, "test", max_length=args.max_length, limit=limit)

    lora_collapsed = collapsed(results["lora"]["train"]["history"])
    target = None if lora_collapsed else final_train_loss(results["lora"]["train"]["history"])
    metric = "test_accuracy" if spec.task == "seq-cls" else "test_exact_match"
    rows = []
    for method, r in results.items():
        hist = r["train"]["history"]
        bad = collapsed(hist)
        reach = None if bad or target is None or method == "lora" else steps_to_reach(hist, target)
        rows.append({"method": method, "lr": args.lr_lora_ga if method == "lora-ga" else args.lr_lora,
                     metric: r["test"][metric], "test_loss": r["test"]["test_loss"],
                     "first_train_loss": first_train_loss(hist), "final_train_loss": final_train_loss(hist),
                     "collapsed": bad, "steps_to_lora_final_loss": reach,
                     "steps": args.max_steps, "wall_s": round(r["wall_s"], 1),
                     "mlflow_run_id": r["train"].get("mlflow_run_id")})
    table = _table(rows, metric, target, args)
    print(table, flush=True)
    (out / "summary.md").write_text(table)
    write_json(out / "summary.json", {"rows": rows, "init": init_summary, "timings": timings,
                                      "tracking_uri": tracking_uri, "args": dataclasses.asdict(args)})
    plot_method_curves({m: r["train"]["history"] for m, r in results.items()}, out / "loss_curves.png", target=target,
                       title=f"LoRA-GA vs LoRA: {args.model} on {args.data}")
    print(f"[demo] loss curves: {out / 'loss_curves.png'}\n[demo] MLflow: mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1", flush=True)
    return 0


def _table(rows, metric, target, args) -> str:
    """The summary table. The steps-to-LoRA's-final-loss column is there only when LoRA's run is
    a target worth reaching (it did not collapse); a collapsed run is flagged, not timed."""
    head = (f"LoRA-GA vs LoRA on {args.model} / {args.data}: r={args.rank}, alpha={args.alpha:g}, "
            f"{args.max_steps} steps of {args.batch_size}")
    cols = ["method", "lr", metric.replace("_", " "), "test loss", "train loss: first -> final"]
    if target is not None:
        cols.append(f"steps to LoRA's final train loss ({target:.3f})")
    cols.append("wall s")
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        loss = f"{r['first_train_loss']:.3f} -> {r['final_train_loss']:.3f}"
        if r["collapsed"]:
            loss += " (diverged / collapsed)"
        cells = [r["method"], f"{r['lr']:g}", f"{r[metric]:.3f}", f"{r['test_loss']:.3f}", loss]
        if target is not None:
            if r["method"] == "lora":
                cells.append("(the reference)")
            elif r["collapsed"]:
                cells.append("-")
            else:
                cells.append("not reached" if r["steps_to_lora_final_loss"] is None else str(r["steps_to_lora_final_loss"]))
        cells.append(f"{r['wall_s']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    if target is None:
        lines += ["", "LoRA's run diverged / collapsed (its loss ended above where it started, or gave back most of its "
                      "drop), so its final loss is no target: the steps-to-loss column is left out."]
    return "\n".join(lines) + "\n"


# the workers' environment without --verbose: transformers' load reports and progress bars off
HUSHED_ENV = {"worker_process_setup_hook": "loraga_ray.jobs.demo.hush_worker",
              "env_vars": {"TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
                           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}}


def hush_driver() -> None:
    """The demo's driver without --verbose: MLflow's set-up lines and our own INFO lines (the demo
    prints its own) go, and with them what :func:`hush_worker` quiets in the workers."""
    import importlib

    importlib.import_module("mlflow")  # it sets its loggers' level when imported: set ours after that
    for name in ("mlflow", "alembic", "loraga_ray"):
        logging.getLogger(name).setLevel(logging.WARNING)
    _hush()


def _hush() -> None:
    """Deprecation and future warnings (Ray's RayDeprecationWarning among them), Ray Data's, Tune's
    and Train's notices below errors (e.g. "progress bars disabled"), transformers' load reports
    and progress bars: off. Errors, and our own warnings, still show."""
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("ray.data", "ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def hush_worker() -> None:
    """Worker setup hook of a demo without --verbose: the step lines stay; Ray Data's execution
    lines, transformers' load reports and deprecation warnings go."""
    from .cluster import quiet_ray_internals

    quiet_ray_internals()
    _hush()
