"""Does LoRA-GA reach full fine-tuning quality and converge faster than LoRA? Measured offline.

Runs through loraga-ray's own ``tune`` machinery, with every choice made on the validation split
and fixed here before any test result:

0. one init artifact per seed (256 training examples drawn with that seed): LoRA-GA and LoRA-One
   both start from it, and its classifier head is the head every method at that seed starts from;
1. seed 0: every method x the SAME lr grid with the new head at the adapter's lr ("tied"); for a
   classifier also every method at SHARED_LR with the head at max(lr, HEAD_FLOOR) ("floor"): the
   rule with the higher mean validation score over methods there is used for every method from
   then on (floor: its other grid points are run too); each method's lr is its best on
   validation (accuracy / exact match, ties by eval loss); with --extend-edges, a best lr on the
   grid's edge adds one point beyond it, for every method, once;
2. seeds 1, 2: protocol (b), each method at its chosen lr, and protocol (a), the LoRA-GA paper's,
   every LoRA method at the one SHARED_LR (full fine-tuning stays at its own lr, as the reference);
3. test metrics, last: each reported trial's exported adapter (or full weights) loaded onto a
   fresh, unmodified base and evaluated on the test split;
4. convergence: steps each method's training loss (10-step moving mean) needs to reach plain
   LoRA's final training loss under the same seed and protocol; a run whose loss ends above its
   start, or gives back more than half its drop, is flagged "collapsed" instead. Eval loss every
   5 steps over the first 40, plotted, shows the early phase.

    python benchmarks/convergence.py                      # minilm, the default run (2 CPU cores)
    python benchmarks/convergence.py --experiments minilm,smollm2
    python benchmarks/convergence.py --device cuda        # larger GPU_SETTINGS, full FT of SmolLM2 too
    python benchmarks/convergence.py --report-only        # tables and plots from the saved JSON

Raw results: benchmarks/results/convergence/<experiment>.json; tables: convergence_<exp>.md;
plots: convergence_<exp>_loss.png (train loss), convergence_<exp>_early.png (eval loss, first
40 steps), convergence_<exp>_metric.png; the headline over the experiments: convergence.md and
convergence_loss.png. A stopped run resumes where it was (each search resumes from its folder
under --work).
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
sys.path.insert(0, str(HERE.parent))  # the checkout's loraga_ray, also when run as a script

from loraga_ray.jobs.demo import DEMO_BUDGETS, EARLY_EVERY, EARLY_UNTIL  # noqa: E402  the demo runs at this budget
RESULTS = HERE / "results"

# The same for every method, fixed before the runs whose results are reported. (A first run with
# {1e-4, 1e-3} left PiSSA at the majority class on validation at both points, so 3e-4 was added.)
LR_GRID = [1e-4, 3e-4, 1e-3]
SEEDS = [0, 1, 2]
# Protocol (a), the LoRA-GA paper's: one lr for every LoRA method. 1e-4, a point of the grid, the
# lr at which full fine-tuning did best on validation in this benchmark's earlier runs.
SHARED_LR = 1e-4
# The head rules compared on validation (classifiers): the new head at the adapter's lr ("tied"),
# or at max(lr, HEAD_FLOOR) ("floor"), the same rule for every method.
HEAD_FLOOR = 1e-3
BUDGET = {k: {f: v for f, v in b.items() if f != "data"} for k, b in DEMO_BUDGETS.items()}

EXPERIMENTS = {
    # the GLUE/SST-2 analogue
    "minilm": dict(model="demo-minilm", data="demo-rotten-tomatoes",
                   methods=["full", "lora", "pissa", "peft-lora-ga", "lora-ga", "lora-one"],
                   **BUDGET["demo-minilm"], eval_every=BUDGET["demo-minilm"]["max_steps"], eval_samples=256,
                   test_limit=None, lr_grid=LR_GRID, seeds=SEEDS),
    # the GSM8K analogue; full fine-tuning of 135M parameters does not fit the CPU budget
    "smollm2": dict(model="demo-smollm2", data="demo-arithmetic",
                    methods=["lora", "pissa", "peft-lora-ga", "lora-ga", "lora-one"],
                    **BUDGET["demo-smollm2"], eval_every=BUDGET["demo-smollm2"]["max_steps"], eval_samples=64,
                    test_limit=200, lr_grid=LR_GRID, seeds=SEEDS),
}
# Larger settings for a GPU (`--device cuda`): longer runs, full evaluation splits, and full
# fine-tuning of SmolLM2 too. Results go to <experiment>_gpu.json so the CPU figures stay.
GPU_SETTINGS = {
    "minilm": dict(max_steps=300, batch_size=32, max_length=128, eval_every=100, eval_samples=1024),
    "smollm2": dict(methods=["full", "lora", "pissa", "peft-lora-ga", "lora-ga", "lora-one"], max_steps=300, batch_size=16,
                    max_length=64, eval_every=100, eval_samples=256, test_limit=None),
}
RANK, ALPHA = 8, 16.0
MAX_CONCURRENT = 2
DEVICE = "auto"
TRIAL_RUNNER = "auto"  # --trial-runner: single-worker CPU trials train inside their Tune trial
EXTEND_EDGES = False  # the edge rule of edge_points(); --extend-edges turns it on


def _space_file(folder: Path, values: dict) -> str:
    """The space beside the search's folder (a search refuses an --out holding files it did not write)."""
    import yaml

    folder.parent.mkdir(parents=True, exist_ok=True)
    path = folder.parent / f"{folder.name}.space.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return str(path)


def _search(exp: dict, out: Path, init: str, space: dict, artifact: str | None, seed: int = 0, **over):
    from loraga_ray.jobs.search import SearchOptions, search
    from loraga_ray.options import TrainOptions

    base = TrainOptions(
        model=exp["model"], data=exp["data"], out=str(out), init=init, artifact=artifact,
        rank=over.get("rank", RANK), alpha=ALPHA, scale=over.get("scale", "stable"), lr=over.get("lr", 1e-4),
        max_steps=exp["max_steps"], batch_size=exp["batch_size"], max_length=exp["max_length"],
        eval_every=exp["eval_every"], eval_samples=exp["eval_samples"], eval_early_every=EARLY_EVERY,
        eval_early_until=EARLY_UNTIL, seed=seed, workers=1, device=DEVICE, experiment=f"convergence-{exp['model']}",
        **{k: over[k] for k in ("head_warmup_steps", "head_warmup_lr") if k in over},
    )
    sopts = SearchOptions(space=_space_file(out, space), num_samples=1, max_concurrent=MAX_CONCURRENT,
                          trial_runner=TRIAL_RUNNER,
                          grace_period=exp["max_steps"], name="search", resume=(out / "search.json").exists())
    return search(base, sopts, out=out)


def _trial_record(exp: dict, trial_out: Path, row: dict, task_metric: str) -> dict:
    """A finished trial as the record keeps it; its test metric comes later (:func:`_attach_test`),
    only for the runs a comparison reports, after every choice was made on validation."""
    from loraga_ray.curves import final_train_loss

    metrics = json.loads((trial_out / "metrics.json").read_text())
    history = metrics["history"]
    val_key = task_metric.replace("test_", "eval_")
    return {"config": {k: row.get(k) for k in ("init", "lr", "seed", "rank", "scale", "head_lr")},
            "val": {k: row.get(k) for k in ("eval_loss", "eval_accuracy", "eval_exact_match")},
            "history": [{k: h.get(k) for k in ("step", "train_loss", "eval_loss", val_key)} for h in history],
            "final_train_loss": final_train_loss(history), "time_s": row.get("time_s"),
            "train_s": history[-1].get("elapsed_s") if history else None, "trial_out": str(trial_out)}


def _attach_test(exp: dict, run: dict) -> None:
    """Evaluate one reported run's exported adapter (or weights) on the test split, loaded onto a
    fresh, unmodified base (cached in its trial folder)."""
    from loraga_ray.training.evaluate import evaluate_split, load_finished

    if "test" in run:
        return
    trial_out = Path(run["trial_out"])
    cache = trial_out / "test_eval.json"  # a resumed run does not evaluate a finished trial again
    key = {"data": exp["data"], "max_length": exp["max_length"], "limit": exp["test_limit"]}
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    if cached.get("key") == key:
        run["test"] = cached["test"]
        return
    model, spec = load_finished(exp["model"], trial_out, seed=run["config"]["seed"])
    run["test"] = evaluate_split(model, spec, exp["data"], "test", max_length=exp["max_length"], limit=exp["test_limit"])
    cache.write_text(json.dumps({"key": key, "test": run["test"]}))


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


def head_lr_of(rule: str, lr: float) -> float | None:
    """The head's lr under a rule: ``tied`` trains it at the adapter's lr (None: --head-lr
    unset); ``floor`` at max(lr, HEAD_FLOOR), the same for every method."""
    if rule == "tied" or lr >= HEAD_FLOOR:
        return None
    return HEAD_FLOOR


def _rule_of(run: dict) -> set[str]:
    """The head rules a run was trained under (at lr >= HEAD_FLOOR both rules are the same run)."""
    lr, head = run["config"]["lr"], run["config"].get("head_lr")
    if head is None:
        return {"tied", "floor"} if lr >= HEAD_FLOOR else {"tied"}
    return {"floor"} if math.isclose(head, HEAD_FLOOR) and lr < HEAD_FLOOR else set()


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6)


def _choose(runs: list, val_metric: str) -> dict:
    """The best run on the validation split (the task metric, ties by eval loss)."""
    return max(runs, key=lambda r: ((r["val"].get(val_metric) or 0.0), -(r["val"].get("eval_loss") or 1e9)))


def protocol_runs(record: dict, protocol: str) -> list:
    """The runs of one comparison. (b): every method at its best validation lr from the shared
    grid; (a): every LoRA method at the one shared lr, full fine-tuning at its best lr as the
    reference. Both under the chosen head rule."""
    rule = record.get("head_rule", "tied")
    lrs = record["chosen_lr"] if protocol == "b" else {
        m: (record["chosen_lr"].get(m) if m == "full" else record["shared_lr"]) for m in record["settings"]["methods"]}
    out, seen = [], set()
    for run in record["runs"]:
        c = run["config"]
        want = lrs.get(c["init"])
        if want is None or not _same(c["lr"], want) or rule not in _rule_of(run):
            continue
        key = (c["init"], c["seed"])
        if key not in seen:
            seen.add(key)
            out.append(run)
    return out


def _estimate(exp: dict, folder: Path, seed: int, record: dict) -> Path:
    """The init artifact of one seed: the head it carries is the one every method at this seed
    starts from (``load_model(seed=...)`` draws the same head), and its sample is drawn with the
    same seed."""
    from loraga_ray import InitOptions, run_init

    if not (folder / "meta.json").exists():
        t0 = time.time()
        run_init(InitOptions(model=exp["model"], data=exp["data"], out=str(folder), num_samples=256, batch_size=8,
                             max_rank=RANK, max_length=exp["max_length"], seed=seed))
        record["timings"][f"init_seed{seed}_s"] = time.time() - t0
    return folder


def run_experiment(name: str, exp: dict, out_root: Path) -> dict:
    from loraga_ray.jobs.cluster import connect
    from loraga_ray.models import resolve_model
    from loraga_ray.options import ARTIFACT_INITS

    connect(None, num_cpus=8, quiet=True)
    task = resolve_model(exp["model"]).task
    metric = "test_accuracy" if task == "seq-cls" else "test_exact_match"
    val_metric = metric.replace("test_", "eval_")
    work = out_root / name
    record = {"experiment": name, "settings": {k: v for k, v in exp.items()}, "rank": RANK, "alpha": ALPHA,
              "metric": metric, "runs": [], "chosen_lr": {}, "timings": {}, "shared_lr": SHARED_LR,
              "head_floor": HEAD_FLOOR, "early_eval": [EARLY_EVERY, EARLY_UNTIL]}
    methods = exp["methods"]
    seen: set = set()

    def collect(res, seed: int, stage: str) -> None:
        for row, trial_out in _rows_with_outputs(res):
            rec = dict(_trial_record(exp, trial_out, dict(row, seed=seed), metric), stage=stage)
            c = rec["config"]
            key = (c["init"], c["lr"], c.get("head_lr"), c["seed"])
            if key not in seen:
                seen.add(key)
                record["runs"].append(rec)

    def run_lrs(folder: Path, seed: int, artifact: Path, pairs: list[tuple[str, float]], rule: str, stage: str) -> None:
        """(method, lr) pairs at one seed: one search per lr (the methods as a grid)."""
        by_lr: dict[float, list[str]] = {}
        for m, lr in pairs:
            if not any(r["config"]["seed"] == seed and r["config"]["init"] == m and _same(r["config"]["lr"], lr)
                       and rule in _rule_of(r) for r in record["runs"]):
                by_lr.setdefault(lr, []).append(m)
        for lr, ms in sorted(by_lr.items()):
            space = {"init": {"grid": ms}, "lr": lr}
            if head_lr_of(rule, lr) is not None and task == "seq-cls":
                space["head_lr"] = head_lr_of(rule, lr)
            sub = folder / f"lr{lr:g}{'' if 'head_lr' not in space else '_head' + format(space['head_lr'], 'g')}"
            base_init = next((m for m in ms if m in ARTIFACT_INITS), ms[0])  # --artifact needs an init that reads it
            collect(_search(exp, sub, base_init, space, str(artifact) if base_init in ARTIFACT_INITS else None,
                            seed=seed), seed, stage)

    # 0. one init artifact per seed (its head is the one every method at that seed starts from)
    t0 = time.time()
    artifacts = {s: _estimate(exp, work / f"init_seed{s}", s, record) for s in exp["seeds"]}
    record["timings"]["init_s"] = time.time() - t0

    # 1. learning rate (and, for a classifier, the head rule) on the validation split at seed 0:
    #    every method x the SAME lr grid under both head rules, then the edge rule once
    t0 = time.time()
    grid = list(exp["lr_grid"])
    run_lrs(work / "lr_tied", 0, artifacts[0], [(m, lr) for m in methods for lr in grid], "tied", "lr")
    rule, scores = "tied", {}
    if task == "seq-cls" and SHARED_LR < HEAD_FLOOR:
        # the head rules side by side at the shared lr (where they differ most: 10x); the better
        # mean over methods decides for every method, and then for the rest of the grid
        run_lrs(work / "lr_floor", 0, artifacts[0], [(m, SHARED_LR) for m in methods], "floor", "lr")
        for r_ in ("tied", "floor"):
            vals = [next((r["val"].get(val_metric) or 0.0 for r in record["runs"] if r["config"]["seed"] == 0
                          and r["config"]["init"] == m and _same(r["config"]["lr"], SHARED_LR) and r_ in _rule_of(r)),
                         None) for m in methods]
            if None in vals:
                raise RuntimeError(f"[{name}] no finished run at lr {SHARED_LR:g} under the {r_} head rule for "
                                   f"{[m for m, v in zip(methods, vals) if v is None]}: see their trial folders")
            scores[r_] = statistics.mean(vals)
        rule = max(("tied", "floor"), key=lambda r_: (scores[r_], r_ == "tied"))  # a tie keeps the simpler rule
        if rule == "floor":
            rest = [lr for lr in grid if lr < HEAD_FLOOR and not _same(lr, SHARED_LR)]
            run_lrs(work / "lr_floor", 0, artifacts[0], [(m, lr) for m in methods for lr in rest], "floor", "lr")
    record["head_rule"], record["head_rule_scores"] = rule, scores
    print(f"[{name}] head rule: {rule} (mean validation {val_metric} over methods at lr {SHARED_LR:g}: "
          f"{', '.join(f'{k} {v:.4f}' for k, v in scores.items())})", flush=True)

    def best_by_method(rule: str, lrs: list[float]) -> dict[str, dict]:
        out = {}
        for m in methods:
            cands = [r for r in record["runs"] if r["config"]["seed"] == 0 and r["config"]["init"] == m
                     and rule in _rule_of(r) and any(_same(r["config"]["lr"], v) for v in lrs)]
            if cands:
                out[m] = _choose(cands, val_metric)
        return out

    chosen = {m: float(b["config"]["lr"]) for m, b in best_by_method(rule, grid).items()}
    extra = edge_points(grid, chosen) if EXTEND_EDGES else []
    if extra:
        print(f"[{name}] best lr on the grid's edge for {sorted(m for m, v in chosen.items() if v in (min(grid), max(grid)))}: "
              f"adding {extra} for every method", flush=True)
        run_lrs(work / f"lr_{rule}_edges", 0, artifacts[0], [(m, lr) for m in methods for lr in extra], rule, "lr")
    grid = sorted(grid + extra)
    record["settings"]["lr_grid"] = grid
    record["lr_grid_added"] = extra
    record["timings"]["lr_selection_s"] = time.time() - t0
    for m, b in best_by_method(rule, grid).items():
        record["chosen_lr"][m] = float(b["config"]["lr"])
        print(f"[{name}] {m}: lr {b['config']['lr']:g} (val {b['val'].get(val_metric)})", flush=True)
    record["lr_grid"] = {m: [{"lr": r["config"]["lr"], "head_lr": r["config"].get("head_lr"),
                              "rules": sorted(_rule_of(r)), "val": r["val"].get(val_metric),
                              "eval_loss": r["val"].get("eval_loss")}
                             for r in record["runs"] if r["config"]["init"] == m and r["config"]["seed"] == 0]
                         for m in methods}
    _save(name, record)

    # 2. the other seeds: (b) each method at its chosen lr, (a) each LoRA method at the shared lr
    for seed in exp["seeds"][1:]:
        t0 = time.time()
        pairs = [(m, lr) for m, lr in record["chosen_lr"].items()]
        pairs += [(m, SHARED_LR) for m in methods if m != "full" and not _same(record["chosen_lr"].get(m, -1), SHARED_LR)]
        run_lrs(work / f"seed{seed}_{rule}", seed, artifacts[seed], pairs, rule, "seeds")
        record["timings"][f"seed{seed}_s"] = time.time() - t0
        _save(name, record)

    # 3. test metrics, only now and only for the runs the two comparisons report
    t0 = time.time()
    for protocol in ("a", "b"):
        for run in protocol_runs(record, protocol):
            _attach_test(exp, run)
    record["timings"]["test_eval_s"] = time.time() - t0
    return record


def _save(name: str, record: dict) -> None:
    folder = RESULTS / "convergence"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(record, indent=1, default=float))


def _steps_to(history, target, window=10):
    from loraga_ray.curves import steps_to_reach

    return steps_to_reach(history, target, window)


LABELS = {"full": "full fine-tuning", "lora": "LoRA", "pissa": "PiSSA", "peft-lora-ga": "PEFT `lora_ga`",
          "lora-ga": "**LoRA-GA (loraga-ray)**", "lora-one": "LoRA-One (loraga-ray)"}
COLORS = {"full": "tab:blue", "lora": "tab:orange", "pissa": "tab:green", "peft-lora-ga": "tab:red",
          "lora-ga": "tab:purple", "lora-one": "tab:brown"}  # same in every plot
PROTOCOLS = {"a": "(a) one lr shared by every LoRA method", "b": "(b) each method at its best validation lr"}


def _final_by_seed(runs: list) -> dict:
    """seed -> final training loss (10-step mean) of these runs."""
    return {r["config"]["seed"]: r["final_train_loss"] for r in runs}


def summarise(record: dict, runs: list | None = None) -> dict:
    """Per method (over ``runs``, default all of the record's): test metric mean/std over seeds,
    final train loss, and the steps each seed's training loss (10-step moving mean) needs to reach
    plain LoRA's final training loss under the same seed (same data order, same head). A run whose
    loss ends above where it started is flagged ``collapsed`` and gets no steps figure."""
    from loraga_ray.curves import collapsed

    metric = record["metric"]
    by: dict[str, list] = {}
    for run in record["runs"] if runs is None else runs:
        by.setdefault(run["config"]["init"], []).append(run)
    lora_final = _final_by_seed([r for r in by.get("lora", []) if not collapsed(r["history"])])
    out = {}
    for method, rs in by.items():
        vals = [r["test"][metric] for r in rs if "test" in r]
        bad = sorted(r["config"]["seed"] for r in rs if collapsed(r["history"]))
        reach_by_seed = {r["config"]["seed"]: _steps_to(r["history"], lora_final[r["config"]["seed"]])
                         for r in rs if r["config"]["seed"] in lora_final and r["config"]["seed"] not in bad}
        reach = list(reach_by_seed.values())
        hit = [x for x in reach if x is not None]
        out[method] = dict(lr=rs[0]["config"]["lr"], mean=statistics.mean(vals) if vals else float("nan"),
                           std=statistics.stdev(vals) if len(vals) > 1 else 0.0, n=len(vals),
                           final_loss=statistics.mean(r["final_train_loss"] for r in rs),
                           reach=reach, reach_by_seed=reach_by_seed, collapsed=bad,
                           reach_mean=statistics.mean(hit) if hit else None, reached=len(hit),
                           seeds=sorted(r["config"]["seed"] for r in rs), runs=rs)
    return out


def _reach_text(s: dict, total: int) -> tuple[str, str]:
    if not s["reach"]:
        return "", ""
    if s["reached"] == 0:
        return f"not within {total} (0/{len(s['reach'])} seeds)", ""
    if s["reached"] < len(s["reach"]):  # a mean over the seeds that got there would flatter it
        return f"{s['reach_mean']:.0f} in {s['reached']}/{len(s['reach'])} seeds, not within {total} in the rest", ""
    return f"{s['reach_mean']:.0f}", f"{s['reach_mean'] / total:.2f}"


def _protocols(record: dict) -> dict[str, list]:
    """protocol -> its runs; a record without the two protocols is one comparison (b)."""
    if "shared_lr" not in record:
        return {"b": [r for r in record["runs"] if r.get("stage", "main") == "main"]}
    return {p: protocol_runs(record, p) for p in ("a", "b")}


def _table(summary: dict, metric: str, total: int) -> list[str]:
    lines = [f"| method | lr | {metric.replace('_', ' ')} (mean ± std) | seeds | final train loss | "
             "steps to LoRA's final train loss (mean) | fraction of LoRA's steps |",
             "|---|---|---|---|---|---|---|"]
    for method, s in summary.items():
        reach, frac = _reach_text(s, total)
        if s["collapsed"]:
            reach = (f"diverged / collapsed in seed(s) {s['collapsed']}" + (f"; {reach} in the rest" if reach else ""))
        if method == "lora":
            reach, frac = "(the reference)", ""
        lines.append(f"| {method} | {s['lr']:g} | {s['mean']:.3f} ± {s['std']:.3f} | {s['n']} | "
                     f"{s['final_loss']:.3f} | {reach} | {frac} |")
    return lines


def _seed_table(summary: dict, metric: str, seeds: list) -> list[str]:
    lines = ["| method | " + " | ".join(f"seed {k}" for k in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for method, s in summary.items():
        cells = {}
        for r in s["runs"]:
            seed = r["config"]["seed"]
            steps = s["reach_by_seed"].get(seed)
            cells[seed] = (f"{r['test'][metric]:.3f}" if "test" in r else "?") + \
                ("; collapsed" if seed in s["collapsed"] else f"; {steps if steps is not None else '-'}")
        lines.append(f"| {method} | " + " | ".join(cells.get(k, "") for k in seeds) + " |")
    return lines


def report(name: str) -> str:
    """Markdown tables + plots of one experiment, from its saved JSON."""
    record = json.loads((RESULTS / "convergence" / f"{name}.json").read_text())
    metric = record["metric"]
    st = record["settings"]
    total = st["max_steps"]
    protocols = _protocols(record)
    sums = {p: summarise(record, runs) for p, runs in protocols.items()}
    timings = record.get("timings", {})
    minutes = timings.get("total_s")
    sessions = timings.get("sessions_s") or []
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
             ""]
    if "shared_lr" in record:
        lines += [f"Each seed has its own init artifact (256 training examples drawn with that seed); its classifier "
                  f"head is the one every method at that seed starts from. Head rule: "
                  f"**{record.get('head_rule', 'tied')}** (tied: the new head at the adapter's lr; floor: at "
                  f"max(lr, {record.get('head_floor', HEAD_FLOOR):g})), chosen on validation at seed 0 by the mean over "
                  f"methods of their validation score at lr {record['shared_lr']:g}: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in (record.get("head_rule_scores") or {}).items())
                  + f". Eval loss every {record['early_eval'][0]} steps over the first {record['early_eval'][1]}.", ""]
    for p, summary in sums.items():
        if "shared_lr" in record:
            lines += [f"## Protocol {PROTOCOLS[p]}" + (f": lr {record['shared_lr']:g} (full fine-tuning at its own best lr, "
                                                       "as the reference)" if p == "a" else ""), ""]
        lines += _table(summary, metric, total)
        lines += ["", "Per seed (test metric; steps to LoRA's final train loss, '-' = not reached):", ""]
        lines += _seed_table(summary, metric, st["seeds"]) + [""]
    if "lr_grid" in record:
        grid = st["lr_grid"]
        lines += ["## Learning-rate selection (seed 0, validation split)", "",
                  "| method | " + " | ".join(f"lr {lr:g}" for lr in grid) + " |", "|---|" + "---|" * len(grid)]
        for method, rows in record["lr_grid"].items():
            cells = []
            for lr in grid:
                here = [g for g in rows if g.get("val") is not None and math.isclose(float(g["lr"]), lr, rel_tol=1e-6)]
                if "shared_lr" in record:
                    cells.append(" / ".join(f"{g['val']:.3f} ({'both' if len(g['rules']) == 2 else g['rules'][0]})"
                                            for g in here if g.get("rules")))
                else:
                    cells.append(f"{here[0]['val']:.3f}" if here else "")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    if timings:
        lines += ["## Where the time went", ""] + _time_lines(record) + [""]
    text = "\n".join(lines)
    (RESULTS / f"convergence_{name}.md").write_text(text)
    _plots(name, record, sums, metric)
    return text


def _time_lines(record: dict) -> list[str]:
    t = record["timings"]
    trials = [r for r in record["runs"] if r.get("time_s")]
    out = [f"- {k.removesuffix('_s').replace('_', ' ')}: {v / 60:.1f} min" for k, v in t.items()
           if k.endswith("_s") and isinstance(v, (int, float)) and k != "total_s"]
    for stage, label in ((None, "all"), ("lr", "learning-rate stage"), ("seeds", "seed stage")):
        rows = [r for r in trials if r.get("train_s") and (stage is None or r.get("stage") == stage)]
        if not rows:
            continue
        wall = statistics.median(r["time_s"] for r in rows)
        train = statistics.median(r["train_s"] for r in rows)
        runner = record.get("trial_runner", "ray-train")
        what = ("the trial's process: model load, Ray Data pipeline, adapter export" if runner == "in-process" else
                "Ray Train controller and worker, model load, Ray Data pipeline, adapter export")
        out.append(f"- {label}: {len(rows)} trials; per trial (median) {wall:.0f} s wall, of which {train:.0f} s in the "
                   f"training loop (steps and evaluations) and {wall - train:.0f} s start-up and export ({what}); "
                   f"{record.get('max_concurrent', 2)} trials at a time, each trial {runner}")
    if record.get("timing_note"):
        out.append(f"- {record['timing_note']}")
    return out


def headline(names: list[str], suffix: str = "") -> str:
    """One table over the experiments (benchmarks/results/convergence<suffix>.md) and one figure
    with every experiment's loss curves (benchmarks/results/convergence<suffix>_loss.png)."""
    records = {n: json.loads((RESULTS / "convergence" / f"{n}.json").read_text())
               for n in names if (RESULTS / "convergence" / f"{n}.json").exists()}
    if any("shared_lr" in r for r in records.values()):  # results of the earlier harness stay in their own tables
        records = {n: r for n, r in records.items() if "shared_lr" in r}
    if not records:
        return ""
    sums = {n: {p: summarise(r, runs) for p, runs in _protocols(r).items()} for n, r in records.items()}
    methods = [m for m in LABELS if any(m in s for ps in sums.values() for s in ps.values())]
    head, rule = "| method |", "|---|"
    for n, r in records.items():
        metric = r["metric"].replace("test_", "").replace("_", " ")
        head += f" {r['settings']['model']}: test {metric} (b) | steps to LoRA's final loss |"
        rule += "---|---|"
        if "a" in sums[n]:
            head += f" test {metric} (a), lr {r['shared_lr']:g} | steps to LoRA's final loss (a) |"
            rule += "---|---|"
    lines = [head, rule]
    for m in methods:
        row = f"| {LABELS[m]} |"
        for n, r in records.items():
            for p in [p for p in ("b", "a") if p in sums[n]]:
                s = sums[n][p].get(m)
                if s is None:
                    row += " not run | |"
                    continue
                reach, frac = _reach_text(s, r["settings"]["max_steps"])
                if s["collapsed"]:
                    reach = f"collapsed in seed(s) {s['collapsed']}"
                row += (f" {s['mean']:.3f} ± {s['std']:.3f} (n={s['n']}) | "
                        f"{'(reference)' if m == 'lora' else reach}{'' if not frac or m == 'lora' else f' ({frac})'} |")
        lines.append(row)
    text = "\n".join(lines) + "\n"
    (RESULTS / f"convergence{suffix}.md").write_text(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(records), figsize=(6.2 * len(records), 4.2), dpi=110, squeeze=False)
    for ax, (n, r) in zip(axes[0], records.items()):
        _loss_axes(ax, r, sums[n]["b"], "b" if "a" in sums[n] else None)
    fig.tight_layout()
    fig.savefig(RESULTS / f"convergence{suffix}_loss.png")
    plt.close(fig)
    return text


def _mean_curve(runs: list, key: str, smooth: int | None):
    import numpy as np

    from loraga_ray.curves import moving_mean

    curves = []
    for r in runs:
        hist = [h for h in r["history"] if h.get(key) is not None]
        ys = [h[key] for h in hist]
        curves.append((np.array([h["step"] for h in hist]), np.array(moving_mean(ys, smooth) if smooth else ys)))
    n = min(len(c[1]) for c in curves)
    return curves[0][0][:n], np.stack([c[1][:n] for c in curves])


def _loss_axes(ax, record, summary, protocol=None, key="train_loss", until=None):
    """Training loss (10-step moving mean) or eval loss, mean over seeds with a min-max band;
    plain LoRA's final training loss as a dotted line."""
    for method, s in summary.items():
        steps, ys = _mean_curve(s["runs"], key, 10 if key == "train_loss" else None)
        if until is not None:
            keep = steps <= until
            steps, ys = steps[keep], ys[:, keep]
        line, = ax.plot(steps, ys.mean(0), lw=1.8 if method == "lora-ga" else 1.3, color=COLORS.get(method),
                        marker="o" if key == "eval_loss" else None, ms=3,
                        label=f"{LABELS.get(method, method).strip('*')} (lr {s['lr']:g})")
        if len(ys) > 1:
            ax.fill_between(steps, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.12)
    if "lora" in summary and key == "train_loss":
        ax.axhline(summary["lora"]["final_loss"], color="gray", ls=":", lw=1, label="LoRA's final loss")
    st = record["settings"]
    title = f"{st['model']} on {st['data']}, r={record['rank']}"
    ax.set_title(title + (f"\n{PROTOCOLS[protocol]}" if protocol else ""), fontsize=9)
    ax.set_xlabel("step")
    what = "train loss, 10-step mean" if key == "train_loss" else "eval loss (validation sample)"
    ax.set_ylabel(f"{what} (mean of {len(st['seeds'])} seeds, band min-max)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _plots(name, record, sums, metric):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labelled = "a" in sums
    for key, fname, until in (("train_loss", "loss", None), ("eval_loss", "early", record.get("early_eval", [0, None])[1])):
        if key == "eval_loss" and not record.get("early_eval"):
            continue
        fig, axes = plt.subplots(1, len(sums), figsize=(6.4 * len(sums), 4.4), dpi=110, squeeze=False)
        for ax, (p, summary) in zip(axes[0], sorted(sums.items())):
            _loss_axes(ax, record, summary, p if labelled else None, key=key, until=until)
        fig.tight_layout()
        fig.savefig(RESULTS / f"convergence_{name}_{fname}.png")
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 3.8), dpi=110)
    import numpy as np

    names = [m for m in LABELS if any(m in s for s in sums.values())]
    width = 0.8 / len(sums)
    lo, hi = 1.0, 0.0
    for i, (p, summary) in enumerate(sorted(sums.items())):
        xs = [j + i * width for j, m in enumerate(names) if m in summary]
        ms = [m for m in names if m in summary]
        means = [summary[m]["mean"] for m in ms]
        stds = [summary[m]["std"] for m in ms]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=PROTOCOLS[p] if labelled else None,
               color=[COLORS.get(m) for m in ms], alpha=1.0 if p == "b" else 0.55, edgecolor="black", lw=0.4)
        lo = min([lo] + [mu - sd for mu, sd in zip(means, stds)])
        hi = max([hi] + [mu + sd for mu, sd in zip(means, stds)])
    ax.set_xticks(np.arange(len(names)) + width * (len(sums) - 1) / 2, names, rotation=20)
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_ylim(max(0.0, lo - 0.05), min(1.0, hi + 0.03))
    if labelled:
        ax.legend(fontsize=7, title="solid: (b), pale: (a)", title_fontsize=7)
    ax.set_title(f"Test {metric.replace('test_', '').replace('_', ' ')} (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"convergence_{name}_metric.png")
    plt.close(fig)


def _runner_used() -> str:
    """What --trial-runner auto meant here: in-process for one CPU worker per trial."""
    if TRIAL_RUNNER != "auto":
        return TRIAL_RUNNER
    return "ray-train" if DEVICE == "cuda" else "in-process"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiments", default="minilm", help="comma-separated: minilm, smollm2 (default: %(default)s)")
    ap.add_argument("--work", default="runs/convergence", help="where the searches write (default: %(default)s)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--max-concurrent", type=int, default=2, help="trials at a time (each Train worker uses 1 CPU)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, to check the harness end to end (results not kept)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cpu: the 2-core sizes (default); cuda: one GPU per trial and the larger GPU_SETTINGS, "
                         "results in <experiment>_gpu.json")
    ap.add_argument("--trial-runner", choices=["auto", "ray-train", "in-process"], default="auto",
                    help="how each trial trains (loraga-ray tune --trial-runner; auto: in the Tune trial's own "
                         "process for one CPU worker, see results/trial_runner.md)")
    ap.add_argument("--extend-edges", action="store_true",
                    help="when a method's best lr is on the grid's edge, add one point beyond it for every method "
                         "(off by default: the default run fits the 2-core time budget without it)")
    args = ap.parse_args(argv)
    global MAX_CONCURRENT, RESULTS, DEVICE, EXTEND_EDGES, TRIAL_RUNNER
    EXTEND_EDGES = args.extend_edges
    TRIAL_RUNNER = args.trial_runner
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
                       methods=["lora", "lora-ga", "lora-one"])
        EXTEND_EDGES = False
    logging.basicConfig(level=logging.WARNING)
    for name in args.experiments.split(","):
        if not args.report_only:
            import torch

            t0 = time.time()
            prev_file = RESULTS / "convergence" / f"{name + suffix}.json"
            prev_record = json.loads(prev_file.read_text()) if prev_file.exists() else {}
            # earlier sessions of THIS harness's run count; a result file of the earlier harness does not
            # (only when the searches are there to resume: a run in a fresh --work starts the clock again)
            resumed = (work / (name + suffix)).is_dir()
            prev = prev_record.get("timings", {}) if "shared_lr" in prev_record and resumed else {}
            sessions = prev.get("sessions_s") or ([prev["total_s"]] if "total_s" in prev else [])
            record = run_experiment(name + suffix, EXPERIMENTS[name], work)
            gpu = f", {torch.cuda.get_device_name(0)}" if args.device == "cuda" and torch.cuda.is_available() else ""
            record["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores{gpu}, torch {torch.__version__}"
            record.update(trial_runner=_runner_used(), max_concurrent=MAX_CONCURRENT)
            # a resumed run adds to the earlier sessions' time: total_s is what the whole benchmark cost
            record["timings"]["sessions_s"] = sessions + [time.time() - t0]
            record["timings"]["total_s"] = sum(record["timings"]["sessions_s"])
            _save(name + suffix, record)
        print(report(name + suffix), flush=True)
    print(headline([n + suffix for n in EXPERIMENTS], suffix), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
