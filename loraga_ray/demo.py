"""``loraga-ray demo``: LoRA-GA against plain LoRA, end to end, on the embedded default.

1. estimate the LoRA-GA init with the distributed pipeline (Ray Data -> gradient workers -> SVD);
2. fine-tune LoRA-GA and plain LoRA with the same budget through Ray Train, both logged to MLflow;
3. evaluate each exported adapter on the test split, loaded onto a fresh, unmodified base;
4. print a table (test metric, steps to reach LoRA's final training loss, time) and write a PNG
   of both training-loss curves.

The defaults (demo-minilm on demo-rotten-tomatoes) take about ten minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

# Each method's learning rate as benchmarks/convergence.py chose it on the validation split for
# that demo model (benchmarks/results/convergence_<experiment>.md); LoRA-GA wants a lower one than
# plain LoRA. Other models start from the demo-minilm values.
DEFAULT_LR = {"demo-minilm": {"lora-ga": 1e-4, "lora": 1e-3},
              "demo-smollm2": {"lora-ga": 3e-5, "lora": 1e-3}}  # lora-ga: the 3e-5 edge trial won on validation


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo-minilm", help="demo-minilm, demo-smollm2 or a local HF folder (default: %(default)s)")
    p.add_argument("--data", default=None, help="default: demo-rotten-tomatoes for demo-minilm, demo-arithmetic for demo-smollm2")
    p.add_argument("--out", default="runs/demo", help="output folder (default: %(default)s)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--max-steps", type=int, default=None, help="training steps per method (default: 200 for minilm, 100 otherwise)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-samples", type=int, default=256, help="validation examples evaluated during training")
    p.add_argument("--test-samples", type=int, default=None, help="cap on test examples (default: all for classification, 200 for generation)")
    p.add_argument("--num-samples", type=int, default=256, help="examples for the gradient estimate")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr-lora-ga", type=float, default=None, help="default: the benchmark's choice for --model")
    p.add_argument("--lr-lora", type=float, default=None, help="default: the benchmark's choice for --model")
    p.add_argument("--workers", type=int, default=1, help="gradient and training workers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--address", default=None, help="Ray cluster address (default: an embedded local Ray)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite in --out)")


def _defaults(args) -> None:
    if args.data is None:
        args.data = "demo-arithmetic" if args.model == "demo-smollm2" else "demo-rotten-tomatoes"
    if args.max_steps is None:
        args.max_steps = 200 if args.model == "demo-minilm" else 100
    lrs = DEFAULT_LR.get(args.model, DEFAULT_LR["demo-minilm"])
    if args.lr_lora_ga is None:
        args.lr_lora_ga = lrs["lora-ga"]
    if args.lr_lora is None:
        args.lr_lora = lrs["lora"]


def run(args) -> int:
    from .cluster import connect
    from .distributed import InitOptions, run_init
    from .evaluation import evaluate_split, final_train_loss, load_finished, steps_to_reach
    from .models import resolve_model
    from .train import TrainOptions, fit

    _defaults(args)
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    spec = resolve_model(args.model)  # a clear error (with the pip command) before Ray starts
    local = not (args.address or os.environ.get("RAY_ADDRESS"))
    connect(args.address, num_cpus=max(8, os.cpu_count() or 1) if local else None, quiet=True)
    tracking_uri = args.tracking_uri
    if tracking_uri is None:
        from .tracking import default_tracking_uri

        tracking_uri = default_tracking_uri(out)

    timings = {}
    print(f"[demo] 1/4 LoRA-GA gradient estimate: {args.num_samples} samples of {args.data}, {args.workers} worker(s)", flush=True)
    t0 = time.time()
    init_dir = out / "init"
    if (init_dir / "meta.json").exists():
        print(f"[demo]     reusing {init_dir}", flush=True)
        init_summary = {"reused": True}
    else:
        _, init_summary = run_init(InitOptions(
            model=args.model, data=args.data, out=str(init_dir), num_samples=args.num_samples, batch_size=8,
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
    (out / "summary.json").write_text(json.dumps({"rows": rows, "init": init_summary, "timings": timings,
                                                  "tracking_uri": tracking_uri,
                                                  "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}},
                                                 indent=2, default=str))
    _plot(results, target, out / "loss_curves.png", args)
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


def _plot(results, target, path: Path, args) -> None:
    from .evaluation import moving_mean
    from .plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    colors = {"lora-ga": "tab:blue", "lora": "tab:orange"}
    for method, r in results.items():
        hist = r["train"]["history"]
        steps = [h["step"] for h in hist if h.get("train_loss") is not None]
        losses = [h["train_loss"] for h in hist if h.get("train_loss") is not None]
        smooth = moving_mean(losses, 10)
        ax.plot(steps, losses, color=colors[method], alpha=0.25, lw=0.8)
        ax.plot(steps, smooth, color=colors[method], lw=1.8, label=f"{method} train loss (10-step mean)")
        ev = [(h["step"], h["eval_loss"]) for h in hist if h.get("eval_loss") is not None]
        if ev:
            ax.plot(*zip(*ev), color=colors[method], ls="--", marker="o", ms=3, lw=1, label=f"{method} eval loss")
    ax.axhline(target, color="gray", ls=":", lw=1, label="LoRA's final train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"LoRA-GA vs LoRA: {args.model} on {args.data}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
