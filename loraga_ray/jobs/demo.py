"""``loraga-ray demo``: LoRA-GA against plain LoRA, end to end, on the embedded default.

1. estimate the LoRA-GA init with the distributed pipeline (Ray Data -> gradient workers -> SVD);
2. fine-tune LoRA-GA and plain LoRA with the same budget through Ray Train, both logged to MLflow;
3. evaluate each exported adapter on the test split, loaded onto a fresh, unmodified base;
4. print a table (test metric, steps to reach LoRA's final training loss, time) and write a PNG
   of both training-loss curves.

The defaults (demo-minilm on demo-rotten-tomatoes) take about ten minutes on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from ..core.files import output_lock, write_json
from .run_folder import check_ours, claim
from ..options import DemoOptions, InitOptions, TrainOptions

log = logging.getLogger(__name__)

# Each method's learning rate as benchmarks/convergence.py chose it on the validation split for
# that demo model (benchmarks/results/convergence_<experiment>.md); LoRA-GA wants a lower one than
# plain LoRA. Other models start from the demo-minilm values.
DEFAULT_LR = {"demo-minilm": {"lora-ga": 1e-4, "lora": 1e-3},
              "demo-smollm2": {"lora-ga": 3e-5, "lora": 1e-3}}  # lora-ga: the 3e-5 edge trial won on validation


def resolve_defaults(opts: DemoOptions) -> DemoOptions:
    """The demo model's data, length and learning rates where ``opts`` leaves them unset."""
    lrs = DEFAULT_LR.get(opts.model, DEFAULT_LR["demo-minilm"])
    return dataclasses.replace(
        opts,
        data=opts.data if opts.data is not None else ("demo-arithmetic" if opts.model == "demo-smollm2"
                                                      else "demo-rotten-tomatoes"),
        max_steps=opts.max_steps if opts.max_steps is not None else (200 if opts.model == "demo-minilm" else 100),
        lr_lora_ga=opts.lr_lora_ga if opts.lr_lora_ga is not None else lrs["lora-ga"],
        lr_lora=opts.lr_lora if opts.lr_lora is not None else lrs["lora"],
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
    from ..curves import final_train_loss, steps_to_reach
    from ..models import resolve_model
    from ..plots import plot_method_curves
    from ..tracking import default_tracking_uri
    from ..training.evaluate import evaluate_split, load_finished
    from .cluster import connect
    from .init import run_init
    from .train import fit

    spec = resolve_model(args.model)  # a clear error (with the pip command) before Ray starts
    connect(args.address, min_cpus=8, quiet=True)
    tracking_uri = args.tracking_uri or default_tracking_uri(out)

    timings = {}
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
            eval_samples=args.eval_samples, max_length=args.max_length, seed=args.seed, workers=args.workers,
            tracking_uri=tracking_uri, experiment="loraga-ray-demo", run_name=f"demo-{method}", address=args.address,
            resume=(out / method / "train_options.json").exists()))
        results[method] = {"train": res, "wall_s": time.time() - t0}

    print("[demo] 4/4 test-split evaluation of the exported adapters on a fresh base", flush=True)
    limit = args.test_samples if args.test_samples is not None else (None if spec.task == "seq-cls" else 200)
    for method, r in results.items():
        model, mspec = load_finished(args.model, out / method, seed=args.seed)
        r["test"] = evaluate_split(model, mspec, args.data, "test", max_length=args.max_length, limit=limit)

    target = final_train_loss(results["lora"]["train"]["history"])
    metric = "test_accuracy" if spec.task == "seq-cls" else "test_exact_match"
    rows = []
    for method, r in results.items():
        hist = r["train"]["history"]
        reach = steps_to_reach(hist, target)
        rows.append({"method": method, "lr": args.lr_lora_ga if method == "lora-ga" else args.lr_lora,
                     metric: r["test"][metric], "test_loss": r["test"]["test_loss"],
                     "final_train_loss": final_train_loss(hist), "steps_to_lora_final_loss": reach,
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
    lines = [f"LoRA-GA vs LoRA on {args.model} / {args.data}: r={args.rank}, alpha={args.alpha:g}, "
             f"{args.max_steps} steps of {args.batch_size}",
             "", f"| method | lr | {metric.replace('_', ' ')} | test loss | final train loss | "
             f"steps to LoRA's final train loss ({target:.3f}) | wall s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        reach = "never" if r["steps_to_lora_final_loss"] is None else str(r["steps_to_lora_final_loss"])
        lines.append(f"| {r['method']} | {r['lr']:g} | {r[metric]:.3f} | {r['test_loss']:.3f} | "
                     f"{r['final_train_loss']:.3f} | {reach} | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"
