"""Does LoRA-GA reach full fine-tuning quality and converge faster than LoRA? Measured offline.

Runs through loraga-ray's own ``tune`` machinery:

1. learning-rate selection: one search over every method x the SAME lr grid, seed 0; each method's
   lr is chosen on the validation split (accuracy / exact match, ties by eval loss); the grid is
   fixed here, before any test result;
2. seeds: one search per method, at its chosen lr, over the other seeds;
3. test metrics: each finished trial's exported adapter (or full weights) is loaded onto a fresh,
   unmodified base and evaluated on the test split;
4. convergence: steps each method's training loss (10-step moving mean) needs to reach plain LoRA's
   final training loss under the same seed.

The LoRA-GA trials of an experiment share one gradient estimate (max rank 32, so the rank
ablation can use it too). Ablations (minilm): LoRA-GA at rank 32, and with ``scale=unit``
(no stable scale), at LoRA-GA's chosen lr, all seeds.

    python benchmarks/convergence.py                      # both experiments, CPU sizes
    python benchmarks/convergence.py --experiments minilm
    python benchmarks/convergence.py --device cuda        # larger GPU_SETTINGS, full FT of SmolLM2 too
    python benchmarks/convergence.py --report-only        # tables and plots from the saved JSON

Raw results: benchmarks/results/convergence/<experiment>.json; tables: convergence_<exp>.md;
plots: convergence_<exp>_loss.png, convergence_<exp>_metric.png; the headline over both
experiments: convergence.md and convergence_loss.png. A stopped run resumes where it was (each
search resumes from its folder under --work).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# The same for every method, fixed before the runs whose results are reported. (A first run with
# {1e-4, 1e-3} left PiSSA at the majority class on validation at both points, so 3e-4 was added.)
LR_GRID = [1e-4, 3e-4, 1e-3]
SEEDS = [0, 1, 2]

EXPERIMENTS = {
    # the GLUE/SST-2 analogue
    "minilm": dict(model="demo-minilm", data="demo-rotten-tomatoes", methods=["full", "lora", "pissa", "peft-lora-ga", "lora-ga"],
                   max_steps=80, batch_size=16, max_length=64, eval_every=80, eval_samples=256, test_limit=None,
                   lr_grid=LR_GRID, seeds=SEEDS, ablations=True),
    # the GSM8K analogue; full fine-tuning of 135M parameters does not fit the CPU budget
    "smollm2": dict(model="demo-smollm2", data="demo-arithmetic", methods=["lora", "pissa", "peft-lora-ga", "lora-ga"],
                    max_steps=60, batch_size=8, max_length=48, eval_every=60, eval_samples=64, test_limit=200,
                    lr_grid=LR_GRID, seeds=SEEDS, ablations=False),
}
# Larger settings for a GPU (`--device cuda`): longer runs, full evaluation splits, and full
# fine-tuning of SmolLM2 too. Results go to <experiment>_gpu.json so the CPU figures stay.
GPU_SETTINGS = {
    "minilm": dict(max_steps=300, batch_size=32, max_length=128, eval_every=100, eval_samples=1024),
    "smollm2": dict(methods=["full", "lora", "pissa", "peft-lora-ga", "lora-ga"], max_steps=300, batch_size=16,
                    max_length=64, eval_every=100, eval_samples=256, test_limit=None),
}
RANK, ALPHA = 8, 16.0
MAX_CONCURRENT = 2
DEVICE = "auto"
EXTEND_EDGES = True  # the edge rule of edge_points(); --no-extend-edges turns it off


def _space_file(folder: Path, values: dict) -> str:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return str(path)


def _search(exp: dict, out: Path, init: str, space: dict, artifact: str | None, seed: int = 0, **over):
    from loraga_ray.options import TrainOptions
    from loraga_ray.jobs.search import SearchOptions, search

    base = TrainOptions(
        model=exp["model"], data=exp["data"], out=str(out), init=init, artifact=artifact if init == "lora-ga" else None,
        rank=over.get("rank", RANK), alpha=ALPHA, scale=over.get("scale", "stable"), lr=over.get("lr", 1e-4),
        max_steps=exp["max_steps"], batch_size=exp["batch_size"], max_length=exp["max_length"],
        eval_every=exp["eval_every"], eval_samples=exp["eval_samples"], seed=seed, workers=1, device=DEVICE,
        experiment=f"convergence-{exp['model']}",
    )
    sopts = SearchOptions(space=_space_file(out, space), num_samples=1, max_concurrent=MAX_CONCURRENT,
                          grace_period=exp["max_steps"], name="search", resume=(out / "search.json").exists())
    return search(base, sopts, out=out)


def _trial_record(exp: dict, trial_out: Path, row: dict, task_metric: str) -> dict:
    from loraga_ray.curves import final_train_loss
    from loraga_ray.training.evaluate import evaluate_split, load_finished

    metrics = json.loads((trial_out / "metrics.json").read_text())
    history = metrics["history"]
    cache = trial_out / "test_eval.json"  # a resumed run does not evaluate a finished trial again
    key = {"data": exp["data"], "max_length": exp["max_length"], "limit": exp["test_limit"]}
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    if cached.get("key") == key:
        test = cached["test"]
    else:
        model, spec = load_finished(exp["model"], trial_out, seed=row.get("seed", 0))
        test = evaluate_split(model, spec, exp["data"], "test", max_length=exp["max_length"], limit=exp["test_limit"])
        cache.write_text(json.dumps({"key": key, "test": test}))
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


def edge_points(grid: list[float], chosen: dict[str, float]) -> list[float]:
    """The rule for a best lr on the edge of the grid, fixed before any result: when any method's
    validation-chosen lr is the grid's smallest (largest) value, the grid gets one more point a
    half-decade below (above) that edge, for every method, once. Only validation decides it."""
    lo, hi = min(grid), max(grid)
    new = []
    if any(math.isclose(v, lo) for v in chosen.values()):
        new.append(float(f"{lo / math.sqrt(10):.0e}"))
    if any(math.isclose(v, hi) for v in chosen.values()):
        new.append(float(f"{hi * math.sqrt(10):.0e}"))
    return new


def _folder_for_lr(folder: Path, lr: float) -> Path:
    """A stage's search folder; a different lr than the one it holds gets a folder of its own, so
    a resumed run never mixes searches."""
    import yaml

    space = folder / "space.yaml"
    if not space.exists() or math.isclose(float((yaml.safe_load(space.read_text()) or {}).get("lr", lr)), lr):
        return folder
    return folder.with_name(f"{folder.name}_lr{lr:g}")


def _choose(done: list, val_metric: str):
    return max(done, key=lambda rt: ((rt[0].get(val_metric) or 0.0), -(rt[0].get("eval_loss") or 1e9)))


def run_experiment(name: str, exp: dict, out_root: Path) -> dict:
    from loraga_ray.jobs.cluster import connect
    from loraga_ray import InitOptions, run_init
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

    # 1. learning rate: every method x every lr, seed 0, in ONE search (one Tune run packs the trials);
    #    then, by the edge rule, one more search over the added points
    t0 = time.time()
    done_by: dict[str, list] = {}

    def lr_search(folder: Path, grid: list[float]) -> None:
        res = _search(exp, folder, "lora-ga", {"init": {"grid": exp["methods"]}, "lr": {"grid": grid}}, str(artifact))
        for row, trial_out in _rows_with_outputs(res):
            done_by.setdefault(row["init"], []).append((row, trial_out))

    lr_search(work / "lr", exp["lr_grid"])
    chosen = {m: float(_choose(d, val_metric)[0]["lr"]) for m, d in done_by.items()}
    extra = edge_points(exp["lr_grid"], chosen) if EXTEND_EDGES else []
    if extra:
        print(f"[{name}] best lr on the grid's edge for {sorted(m for m, v in chosen.items() if v in (min(exp['lr_grid']), max(exp['lr_grid'])))}: "
              f"adding {extra} for every method", flush=True)
        lr_search(work / "lr-edges", extra)
    record["settings"]["lr_grid"] = sorted(exp["lr_grid"] + extra)
    record["lr_grid_added"] = extra
    record["timings"]["lr_selection_s"] = time.time() - t0
    for method in exp["methods"]:
        done = done_by.get(method, [])
        if not done:
            print(f"[{name}] {method}: no lr finished", flush=True)
            continue
        best = _choose(done, val_metric)
        record["chosen_lr"][method] = float(best[0]["lr"])
        record["runs"].append(dict(_trial_record(exp, best[1], dict(best[0], seed=0), metric), stage="main"))
        record.setdefault("lr_grid", {})[method] = [
            {"lr": r.get("lr"), "val": r.get(val_metric), "eval_loss": r.get("eval_loss")} for r, _ in done]
        print(f"[{name}] {method}: lr {best[0]['lr']:g} (val {best[0].get(val_metric)})", flush=True)
    _save(name, record)

    # 2. the other seeds, each method at its chosen lr
    for method, lr in record["chosen_lr"].items():
        t0 = time.time()
        seeds = _search(exp, _folder_for_lr(work / method / "seeds", lr), method, {"seed": {"grid": exp["seeds"][1:]}, "lr": lr}, str(artifact))
        for row, trial_out in _rows_with_outputs(seeds):
            record["runs"].append(dict(_trial_record(exp, trial_out, dict(row, init=method, lr=lr), metric), stage="main"))
        record["timings"][f"{method}_seeds_s"] = time.time() - t0
        _save(name, record)

    if exp["ablations"] and "lora-ga" in record["chosen_lr"]:
        lr = record["chosen_lr"]["lora-ga"]
        for label, over in (("lora-ga r=32", {"rank": 32}), ("lora-ga scale=unit", {"scale": "unit"})):
            t0 = time.time()
            space = {"seed": {"grid": exp["seeds"]}, "lr": lr, **({"rank": over["rank"]} if "rank" in over else {"scale": over["scale"]})}
            res = _search(exp, _folder_for_lr(work / label.replace(" ", "_").replace("=", ""), lr), "lora-ga", space,
                          str(artifact), **over)
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
    from loraga_ray.curves import steps_to_reach

    return steps_to_reach(history, target, window)


LABELS = {"full": "full fine-tuning", "lora": "LoRA", "pissa": "PiSSA", "peft-lora-ga": "PEFT `lora_ga`",
          "lora-ga": "**LoRA-GA (loraga-ray)**", "lora-ga r=32": "LoRA-GA, r = 32",
          "lora-ga scale=unit": "LoRA-GA, no stable scale"}


COLORS = {"full": "tab:blue", "lora": "tab:orange", "pissa": "tab:green", "peft-lora-ga": "tab:red",
          "lora-ga": "tab:purple", "lora-ga r=32": "tab:brown", "lora-ga scale=unit": "tab:pink"}  # same in every plot


def _final_by_seed(runs: list) -> dict:
    """seed -> final training loss (10-step mean) of these runs."""
    return {r["config"]["seed"]: r["final_train_loss"] for r in runs}


def summarise(record: dict) -> dict:
    """Per method: test metric mean/std over seeds, final train loss, and the steps each seed's
    training loss (10-step moving mean) needs to reach plain LoRA's final training loss under the
    same seed (same data order)."""
    metric = record["metric"]
    by: dict[str, list] = {}
    for run in record["runs"]:
        by.setdefault(run["config"]["init"], []).append(run)
    lora_final = _final_by_seed(by.get("lora", []))
    out = {}
    for method, runs in by.items():
        vals = [r["test"][metric] for r in runs]
        reach_by_seed = {r["config"]["seed"]: _steps_to(r["history"], lora_final[r["config"]["seed"]])
                         for r in runs if r["config"]["seed"] in lora_final}
        reach = list(reach_by_seed.values())
        hit = [s for s in reach if s is not None]
        out[method] = dict(lr=runs[0]["config"]["lr"], mean=statistics.mean(vals),
                           std=statistics.stdev(vals) if len(vals) > 1 else 0.0, n=len(vals),
                           final_loss=statistics.mean(r["final_train_loss"] for r in runs),
                           reach=reach, reach_by_seed=reach_by_seed,
                           reach_mean=statistics.mean(hit) if hit else None, reached=len(hit),
                           seeds=sorted(r["config"]["seed"] for r in runs), runs=runs)
    return out


def _reach_text(s: dict, total: int) -> tuple[str, str]:
    if not s["reach"]:
        return "", ""
    if s["reached"] == 0:
        return f"not within {total} (0/{len(s['reach'])} seeds)", ""
    if s["reached"] < len(s["reach"]):  # a mean over the seeds that got there would flatter it
        return f"{s['reach_mean']:.0f} in {s['reached']}/{len(s['reach'])} seeds, not within {total} in the rest", ""
    return f"{s['reach_mean']:.0f}", f"{s['reach_mean'] / total:.2f}"


def report(name: str) -> str:
    """Markdown table + plots of one experiment, from its saved JSON."""
    record = json.loads((RESULTS / "convergence" / f"{name}.json").read_text())
    metric = record["metric"]
    st = record["settings"]
    total = st["max_steps"]
    summary = summarise(record)
    minutes = record.get("timings", {}).get("total_s")
    sessions = record.get("timings", {}).get("sessions_s") or []
    lines = [f"# Convergence: {st['model']} on {st['data']}",
             "",
             f"r={record['rank']}, alpha={record['alpha']}, all attention and MLP Linears, {total} steps of "
             f"{st['batch_size']}, max length {st['max_length']}, lr grid {st['lr_grid']} (the same for every "
             f"method, chosen on the validation split at seed 0"
             f"{'; ' + str(record['lr_grid_added']) + ' added by the edge rule' if record.get('lr_grid_added') else ''}"
             f"), seeds {st['seeds']}; test split"
             f"{'' if not st.get('test_limit') else ' (first ' + str(st['test_limit']) + ' examples)'}. "
             f"Machine: {record.get('machine', '?')}"
             f"{'' if minutes is None else f'; this experiment took {minutes / 60:.1f} min'}"
             f"{'' if len(sessions) < 2 else ' in ' + str(len(sessions)) + ' sessions (' + ' + '.join(f'{x / 60:.1f}' for x in sessions) + ' min; later ones resumed the earlier)'}.",
             "",
             f"| method | lr | {metric.replace('_', ' ')} (mean ± std) | seeds | final train loss | "
             "steps to LoRA's final train loss (mean) | fraction of LoRA's steps |",
             "|---|---|---|---|---|---|---|"]
    for method, s in summary.items():
        reach, frac = _reach_text(s, total)
        lines.append(f"| {method} | {s['lr']:g} | {s['mean']:.3f} ± {s['std']:.3f} | {s['n']} | "
                     f"{s['final_loss']:.3f} | {reach} | {frac} |")
    lines += ["", "Per seed (test metric; steps to LoRA's final train loss, '-' = not reached):", "",
              "| method | " + " | ".join(f"seed {k}" for k in st["seeds"]) + " |",
              "|---|" + "---|" * len(st["seeds"])]
    for method, s in summary.items():
        cells = {}
        for r in s["runs"]:
            steps = s["reach_by_seed"].get(r["config"]["seed"])
            cells[r["config"]["seed"]] = f"{r['test'][metric]:.3f}; {steps if steps is not None else '-'}"
        lines.append(f"| {method} | " + " | ".join(cells.get(k, "") for k in st["seeds"]) + " |")
    if "lr_grid" in record:
        lines += ["", "Learning-rate selection (seed 0, validation split):", "",
                  "| method | " + " | ".join(f"lr {lr:g}" for lr in st["lr_grid"]) + " |",
                  "|---|" + "---|" * len(st["lr_grid"])]
        for method, grid in record["lr_grid"].items():
            vals = {float(g["lr"]): g["val"] for g in grid}
            lines.append(f"| {method} | " + " | ".join(
                "" if vals.get(lr) is None else f"{vals[lr]:.3f}" for lr in st["lr_grid"]) + " |")
    if record.get("edge_partial"):  # edge-rule trials of an unfinished run: seed 0 only, not in the main table
        lora0 = _final_by_seed(summary.get("lora", {}).get("runs", [])).get(0)
        lines += ["", record.get("note", ""), "", "Edge-rule trials that finished (seed 0 only; not in the table above):", "",
                  f"| method | lr | validation {metric.replace('test_', '').replace('_', ' ')} | {metric.replace('_', ' ')} | "
                  "final train loss | steps to LoRA's final train loss (seed 0) |", "|---|---|---|---|---|---|"]
        for r in record["edge_partial"]:
            steps = _steps_to(r["history"], lora0) if lora0 is not None else None
            lines.append(f"| {r['config']['init']} | {r['config']['lr']:g} | {r['val'].get(metric.replace('test_', 'eval_')):.3f} | "
                         f"{r['test'][metric]:.3f} | {r['final_train_loss']:.3f} | {steps if steps is not None else 'not within ' + str(total)} |")
    text = "\n".join(lines) + "\n"
    (RESULTS / f"convergence_{name}.md").write_text(text)
    _plots(name, record, summary, metric)
    return text


def headline(names: list[str], suffix: str = "") -> str:
    """One table over the experiments (benchmarks/results/convergence<suffix>.md) and one figure
    with every experiment's loss curves (benchmarks/results/convergence<suffix>_loss.png)."""
    records = {n: json.loads((RESULTS / "convergence" / f"{n}.json").read_text())
               for n in names if (RESULTS / "convergence" / f"{n}.json").exists()}
    if not records:
        return ""
    sums = {n: summarise(r) for n, r in records.items()}
    methods = [m for m in LABELS if any(m in s for s in sums.values())]
    head = "| method |"
    rule = "|---|"
    for n, r in records.items():
        metric = r["metric"].replace("test_", "").replace("_", " ")
        head += f" {r['settings']['model']}: test {metric} | steps to LoRA's final loss |"
        rule += "---|---|"
    lines = [head, rule]
    for m in methods:
        row = f"| {LABELS[m]} |"
        for n, r in records.items():
            s = sums[n].get(m)
            if s is None:
                row += " not run | |"
                continue
            reach, frac = _reach_text(s, r["settings"]["max_steps"])
            row += f" {s['mean']:.3f} ± {s['std']:.3f} (n={s['n']}) | {reach}{'' if not frac else f' ({frac})'} |"
        lines.append(row)
    text = "\n".join(lines) + "\n"
    (RESULTS / f"convergence{suffix}.md").write_text(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(records), figsize=(6.2 * len(records), 4.2), dpi=110, squeeze=False)
    for ax, (n, r) in zip(axes[0], records.items()):
        _loss_axes(ax, r, sums[n], main_only=True)
    fig.tight_layout()
    fig.savefig(RESULTS / f"convergence{suffix}_loss.png")
    plt.close(fig)
    return text


def _loss_axes(ax, record, summary, main_only=False):
    """Training loss (10-step moving mean), mean over seeds with a min-max band; plain LoRA's
    final loss as a dotted line."""
    import numpy as np

    from loraga_ray.curves import moving_mean

    for method, s in summary.items():
        if main_only and ("r=" in method or "unit" in method):
            continue
        curves = []
        for r in s["runs"]:
            hist = [h for h in r["history"] if h.get("train_loss") is not None]
            curves.append((np.array([h["step"] for h in hist]), np.array(moving_mean([h["train_loss"] for h in hist], 10))))
        n = min(len(c[1]) for c in curves)
        steps = curves[0][0][:n]
        ys = np.stack([c[1][:n] for c in curves])
        line, = ax.plot(steps, ys.mean(0), lw=1.8 if method == "lora-ga" else 1.3, color=COLORS.get(method),
                        ls="--" if "r=" in method or "unit" in method else "-",
                        label=f"{LABELS.get(method, method).strip('*')} (lr {s['lr']:g})")
        if len(curves) > 1:
            ax.fill_between(steps, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.12)
    if "lora" in summary:
        ax.axhline(summary["lora"]["final_loss"], color="gray", ls=":", lw=1, label="LoRA's final loss")
    st = record["settings"]
    ax.set_title(f"{st['model']} on {st['data']}, r={record['rank']}", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss, 10-step mean (mean of {len(st['seeds'])} seeds, band min-max)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _plots(name, record, summary, metric):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=110)
    _loss_axes(ax, record, summary)
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
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cpu: the 2-core sizes (default); cuda: one GPU per trial and the larger GPU_SETTINGS, "
                         "results in <experiment>_gpu.json")
    ap.add_argument("--no-extend-edges", action="store_true",
                    help="keep the lr grid as it is even when a method's best lr is on its edge")
    args = ap.parse_args(argv)
    global MAX_CONCURRENT, RESULTS, DEVICE, EXTEND_EDGES
    EXTEND_EDGES = not args.no_extend_edges
    MAX_CONCURRENT = args.max_concurrent
    DEVICE = args.device
    suffix = ""
    if args.device == "cuda":
        suffix = "_gpu"
        for key, over in GPU_SETTINGS.items():
            EXPERIMENTS[key].update(over)
    work = Path(args.work).resolve()
    if args.smoke:  # its own folders: never resumes, or overwrites, the real searches and results
        work = work / "smoke"
        RESULTS = work / "results"
        for exp in EXPERIMENTS.values():
            exp.update(max_steps=8, eval_every=4, eval_samples=32, test_limit=48, lr_grid=[1e-4, 1e-3], seeds=[0, 1],
                       methods=["lora", "peft-lora-ga", "lora-ga"], ablations=True)
        EXTEND_EDGES = False
    logging.basicConfig(level=logging.WARNING)
    for name in args.experiments.split(","):
        if not args.report_only:
            import torch

            t0 = time.time()
            prev_file = RESULTS / "convergence" / f"{name + suffix}.json"
            prev = json.loads(prev_file.read_text()).get("timings", {}) if prev_file.exists() else {}
            sessions = prev.get("sessions_s") or ([prev["total_s"]] if "total_s" in prev else [])
            record = run_experiment(name + suffix, EXPERIMENTS[name], work)
            gpu = f", {torch.cuda.get_device_name(0)}" if args.device == "cuda" and torch.cuda.is_available() else ""
            record["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores{gpu}, torch {torch.__version__}"
            # a resumed run adds to the earlier sessions' time: total_s is what the whole benchmark cost
            record["timings"]["sessions_s"] = sessions + [time.time() - t0]
            record["timings"]["total_s"] = sum(record["timings"]["sessions_s"])
            _save(name + suffix, record)
        print(report(name + suffix), flush=True)
    print(headline([n + suffix for n in EXPERIMENTS], suffix), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
