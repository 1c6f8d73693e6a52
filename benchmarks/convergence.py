"""Does LoRA-GA reach full fine-tuning quality and converge faster than LoRA? Measured offline.

Runs through loraga-ray's own ``tune`` machinery (one Ray Tune search per method and stage):

1. learning-rate selection: every method over the SAME lr grid, seed 0, chosen on the validation
   split (accuracy / exact match, ties by eval loss); grids are fixed here, before any test result;
2. seeds: each method at its chosen lr with the other seeds too;
3. test metrics: each finished trial's exported adapter (or full weights) is loaded onto a fresh,
   unmodified base and evaluated on the test split;
4. convergence: steps each method's training loss (10-step moving mean) needs to reach plain LoRA's
   final training loss under the same seed.

The LoRA-GA trials of an experiment share one gradient estimate (max rank 32, so the rank
ablation can use it too). Ablations (minilm): LoRA-GA at rank 32, and with ``scale=unit``
(no stable scale), at LoRA-GA's chosen lr.

    python benchmarks/convergence.py                      # both experiments, CPU sizes
    python benchmarks/convergence.py --experiments minilm
    python benchmarks/convergence.py --report-only        # tables and plots from the saved JSON

Raw results: benchmarks/results/convergence/<experiment>.json; tables: convergence_<exp>.md;
plots: convergence_<exp>_loss.png, convergence_<exp>_metric.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

LR_GRID = [1e-4, 1e-3]  # the same for every method, fixed before any run
SEEDS = [0, 1]
ABLATION_SEEDS = [0]

EXPERIMENTS = {
    # the GLUE/SST-2 analogue
    "minilm": dict(model="demo-minilm", data="demo-rotten-tomatoes", methods=["full", "lora", "pissa", "peft-lora-ga", "lora-ga"],
                   max_steps=80, batch_size=16, max_length=64, eval_every=40, eval_samples=256, test_limit=None,
                   lr_grid=LR_GRID, seeds=SEEDS, ablations=True),
    # the GSM8K analogue; full fine-tuning of 135M parameters does not fit the CPU budget
    "smollm2": dict(model="demo-smollm2", data="demo-arithmetic", methods=["lora", "pissa", "peft-lora-ga", "lora-ga"],
                    max_steps=60, batch_size=8, max_length=48, eval_every=30, eval_samples=64, test_limit=200,
                    lr_grid=[1e-4, 1e-3], seeds=[0, 1], ablations=False),
}
RANK, ALPHA = 8, 16.0
MAX_CONCURRENT = 2


def _space_file(folder: Path, values: dict) -> str:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return str(path)


def _search(exp: dict, out: Path, init: str, space: dict, artifact: str | None, seed: int = 0, **over):
    from loraga_ray.train import TrainOptions
    from loraga_ray.tune import SearchOptions, search

    base = TrainOptions(
        model=exp["model"], data=exp["data"], out=str(out), init=init, artifact=artifact if init == "lora-ga" else None,
        rank=over.get("rank", RANK), alpha=ALPHA, scale=over.get("scale", "stable"), lr=over.get("lr", 1e-4),
        max_steps=exp["max_steps"], batch_size=exp["batch_size"], max_length=exp["max_length"],
        eval_every=exp["eval_every"], eval_samples=exp["eval_samples"], seed=seed, workers=1,
        experiment=f"convergence-{exp['model']}",
    )
    sopts = SearchOptions(space=_space_file(out, space), num_samples=1, max_concurrent=MAX_CONCURRENT,
                          grace_period=exp["max_steps"], name="search", resume=(out / "search.json").exists())
    return search(base, sopts, out=out)


def _trial_record(exp: dict, trial_out: Path, row: dict, task_metric: str) -> dict:
    from loraga_ray.evaluation import evaluate_split, final_train_loss, load_finished

    metrics = json.loads((trial_out / "metrics.json").read_text())
    history = metrics["history"]
    model, spec = load_finished(exp["model"], trial_out, seed=row.get("seed", 0))
    test = evaluate_split(model, spec, exp["data"], "test", max_length=exp["max_length"], limit=exp["test_limit"])
    return {"config": {k: row.get(k) for k in ("init", "lr", "seed", "rank", "scale")},
            "val": {k: row.get(k) for k in ("eval_loss", "eval_accuracy", "eval_exact_match")},
            "test": test, "history": [{k: h.get(k) for k in ("step", "train_loss", "eval_loss", task_metric.replace("test_", "eval_"))}
                                      for h in history],
            "final_train_loss": final_train_loss(history), "time_s": row.get("time_s"), "trial": trial_out.name}


def _rows_with_outputs(res):
    for row in res.rows:
        trial_out = res.out / "trials" / row["trial_id"]
        if row["status"] == "completed" and (trial_out / "metrics.json").exists():
            yield row, trial_out


def run_experiment(name: str, exp: dict, out_root: Path) -> dict:
    from loraga_ray.cluster import connect
    from loraga_ray.distributed import InitOptions, run_init
    from loraga_ray.models import resolve_model

    connect(None, num_cpus=8, quiet=True)
    task = resolve_model(exp["model"]).task
    metric = "test_accuracy" if task == "seq-cls" else "test_exact_match"
    val_metric = metric.replace("test_", "eval_")
    work = out_root / name
    record = {"experiment": name, "settings": {k: v for k, v in exp.items()}, "rank": RANK, "alpha": ALPHA,
              "metric": metric, "runs": [], "chosen_lr": {}, "timings": {}}
    t0 = time.time()
    artifact = work / "init"
    if not (artifact / "meta.json").exists():
        _, summary = run_init(InitOptions(model=exp["model"], data=exp["data"], out=str(artifact), num_samples=256,
                                          batch_size=8, max_rank=32, max_length=exp["max_length"], seed=0))
        record["init_summary"] = summary
    record["timings"]["init_s"] = time.time() - t0

    for method in exp["methods"]:
        t0 = time.time()
        res = _search(exp, work / method / "lr", method, {"lr": {"grid": exp["lr_grid"]}}, str(artifact))
        done = list(_rows_with_outputs(res))
        if not done:
            print(f"[{name}] {method}: no lr finished", flush=True)
            continue
        best = max(done, key=lambda rt: ((rt[0].get(val_metric) or 0.0), -(rt[0].get("eval_loss") or 1e9)))
        lr = float(best[0]["lr"])
        record["chosen_lr"][method] = lr
        record["runs"].append(dict(_trial_record(exp, best[1], dict(best[0], seed=0, init=method), metric), stage="main"))
        record["lr_grid"] = {**record.get("lr_grid", {}), method: [
            {"lr": r.get("lr"), "val": r.get(val_metric), "eval_loss": r.get("eval_loss")} for r, _ in done]}
        print(f"[{name}] {method}: lr {lr:g} (val {best[0].get(val_metric)})", flush=True)
        seeds = _search(exp, work / method / "seeds", method, {"seed": {"grid": exp["seeds"][1:]}, "lr": lr}, str(artifact))
        for row, trial_out in _rows_with_outputs(seeds):
            record["runs"].append(dict(_trial_record(exp, trial_out, dict(row, init=method, lr=lr), metric), stage="main"))
        record["timings"][f"{method}_s"] = time.time() - t0
        _save(name, record)

    if exp["ablations"] and "lora-ga" in record["chosen_lr"]:
        lr = record["chosen_lr"]["lora-ga"]
        for label, over in (("lora-ga r=32", {"rank": 32}), ("lora-ga scale=unit", {"scale": "unit"})):
            t0 = time.time()
            space = {"seed": {"grid": ABLATION_SEEDS}, "lr": lr, **({"rank": over["rank"]} if "rank" in over else {"scale": over["scale"]})}
            res = _search(exp, work / label.replace(" ", "_").replace("=", "") , "lora-ga", space, str(artifact), **over)
            for row, trial_out in _rows_with_outputs(res):
                rec = _trial_record(exp, trial_out, dict(row, init="lora-ga", lr=lr, **over), metric)
                rec["config"]["init"] = label
                record["runs"].append(dict(rec, stage="ablation"))
            record["timings"][f"{label}_s"] = time.time() - t0
            _save(name, record)
    return record


def _save(name: str, record: dict) -> None:
    folder = RESULTS / "convergence"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(record, indent=1, default=float))


def _steps_to(history, target, window=10):
    from loraga_ray.evaluation import steps_to_reach

    return steps_to_reach(history, target, window)


def report(name: str) -> str:
    """Markdown table + plots from the saved JSON."""
    record = json.loads((RESULTS / "convergence" / f"{name}.json").read_text())
    metric = record["metric"]
    by = {}
    for run in record["runs"]:
        by.setdefault(run["config"]["init"], []).append(run)
    lora_final = {r["config"]["seed"]: r["final_train_loss"] for r in by.get("lora", [])}
    lines = [f"# Convergence: {record['settings']['model']} on {record['settings']['data']}",
             "",
             f"r={record['rank']}, alpha={record['alpha']}, {record['settings']['max_steps']} steps of "
             f"{record['settings']['batch_size']}, max length {record['settings']['max_length']}, "
             f"lr grid {record['settings']['lr_grid']} (same for all methods, chosen on validation), seeds "
             f"{sorted({r['config']['seed'] for r in record['runs']})}. Machine: {record.get('machine', '?')}.",
             "",
             f"| method | lr | {metric.replace('_', ' ')} (mean ± std) | seeds | final train loss | steps to LoRA's final train loss (mean) | as a fraction of the run |",
             "|---|---|---|---|---|---|---|"]
    summary = {}
    for method, runs in by.items():
        vals = [r["test"][metric] for r in runs]
        mean = statistics.mean(vals)
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        reach = []
        for r in runs:
            target = lora_final.get(r["config"]["seed"])
            if target is not None:
                s = _steps_to(r["history"], target)
                reach.append(s if s is not None else float("inf"))
        finite = [s for s in reach if s != float("inf")]
        reach_mean = statistics.mean(finite) if finite and len(finite) == len(reach) else None
        total = record["settings"]["max_steps"]
        summary[method] = dict(mean=mean, std=std, n=len(vals), reach=reach_mean)
        lines.append(f"| {method} | {runs[0]['config']['lr']:g} | {mean:.3f} ± {std:.3f} | {len(vals)} | "
                     f"{statistics.mean(r['final_train_loss'] for r in runs):.3f} | "
                     f"{'not reached in ' + str(total) if reach_mean is None else f'{reach_mean:.0f}'} | "
                     f"{'' if reach_mean is None else f'{reach_mean / total:.2f}'} |")
    if "lr_grid" in record:
        lines += ["", "Learning-rate selection (seed 0, validation split):", "",
                  "| method | " + " | ".join(f"lr {lr:g}" for lr in record["settings"]["lr_grid"]) + " |",
                  "|---|" + "---|" * len(record["settings"]["lr_grid"])]
        for method, grid in record["lr_grid"].items():
            vals = {float(g["lr"]): g["val"] for g in grid}
            lines.append(f"| {method} | " + " | ".join(
                "" if vals.get(lr) is None else f"{vals[lr]:.3f}" for lr in record["settings"]["lr_grid"]) + " |")
    text = "\n".join(lines) + "\n"
    (RESULTS / f"convergence_{name}.md").write_text(text)
    _plots(name, record, by, metric, summary)
    return text


def _plots(name, record, by, metric, summary):
    import matplotlib

    from loraga_ray.evaluation import moving_mean

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.4), dpi=110)
    for method, runs in by.items():
        seed0 = [r for r in runs if r["config"]["seed"] == 0] or runs
        hist = seed0[0]["history"]
        steps = [h["step"] for h in hist if h.get("train_loss") is not None]
        losses = [h["train_loss"] for h in hist if h.get("train_loss") is not None]
        smooth = moving_mean(losses, 10)
        ax.plot(steps, smooth, lw=1.6, label=f"{method} (lr {seed0[0]['config']['lr']:g})",
                ls="--" if "r=" in method or "unit" in method else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (10-step mean, seed 0)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Training loss: {record['settings']['model']} on {record['settings']['data']}")
    fig.tight_layout()
    fig.savefig(RESULTS / f"convergence_{name}_loss.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 3.8), dpi=110)
    names = list(summary)
    ax.bar(names, [summary[n]["mean"] for n in names], yerr=[summary[n]["std"] for n in names], capsize=4,
           color=["tab:blue" if n == "lora-ga" else "tab:gray" for n in names])
    ax.set_ylabel(metric.replace("_", " "))
    lo = min(summary[n]["mean"] - summary[n]["std"] for n in names)
    ax.set_ylim(max(0.0, lo - 0.05), min(1.0, max(summary[n]["mean"] + summary[n]["std"] for n in names) + 0.03))
    ax.tick_params(axis="x", rotation=20)
    ax.set_title(f"Test {metric.replace('test_', '').replace('_', ' ')} (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"convergence_{name}_metric.png")
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiments", default="minilm,smollm2")
    ap.add_argument("--work", default="runs/convergence", help="where the searches write (default: %(default)s)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--max-concurrent", type=int, default=2, help="trials at a time (each Train worker uses 1 CPU)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, to check the harness end to end (results not kept)")
    args = ap.parse_args(argv)
    global MAX_CONCURRENT, RESULTS
    MAX_CONCURRENT = args.max_concurrent
    if args.smoke:
        RESULTS = Path(args.work).resolve() / "smoke-results"
        for exp in EXPERIMENTS.values():
            exp.update(max_steps=8, eval_every=4, eval_samples=32, test_limit=48, lr_grid=[1e-4, 1e-3], seeds=[0, 1],
                       methods=["lora", "peft-lora-ga", "lora-ga"], ablations=True)
    logging.basicConfig(level=logging.WARNING)
    for name in args.experiments.split(","):
        if not args.report_only:
            import torch

            t0 = time.time()
            record = run_experiment(name, EXPERIMENTS[name], Path(args.work).resolve())
            record["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
            record["timings"]["total_s"] = time.time() - t0
            _save(name, record)
        print(report(name), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
