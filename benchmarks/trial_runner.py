"""Where a search trial's time goes, and what training it in the Tune trial's own process saves.

One MiniLM trial (LoRA, lr 1e-3, the convergence benchmark's batch, length and evaluation
schedule: eval loss every 5 steps over the first 40, and at the end) as a one-trial search, once
per ``--trial-runner``: ``ray-train`` (a Ray Train run per trial: a Train controller and a
worker process start, each importing torch and transformers, then the model loads and the data
streams) and ``in-process`` (the same loop inside the Tune trial). Each measurement is a fresh
process (its own embedded Ray), the two runners interleaved over the repeats, because these
machines are shared and noisy. Per trial:

* wall: from the trial function's start to its outputs written (metrics.json's ``wall_s``);
* loop: the training loop itself, steps and evaluations (the last step's ``elapsed_s``);
* start-up and export: the rest (actors, imports, model load, data pipeline, adapter export,
  MLflow), i.e. what the runner changes.

The two runners' per-step losses are compared too (they run the same loop on the same data).

    python benchmarks/trial_runner.py                 # ~6 min on 2 CPU cores
    python benchmarks/trial_runner.py --concurrent 2  # two trials at once (lr 1e-3 and 5e-4), as the benchmark runs them
    python benchmarks/trial_runner.py --steps 80      # the convergence benchmark's full budget

Results: results/trial_runner.json and trial_runner.md (``--concurrent N``: trial_runner_concurrentN.*).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from harness import RESULTS, machine, run_interleaved  # noqa: E402

RUNNERS = ["ray-train", "in-process"]


LRS = [1e-3, 5e-4, 3e-4, 2e-3]


def measure(runner: str, steps: int, concurrent: int = 1) -> dict:
    """One search of ``concurrent`` trials, all at once, in this process; each trial's figures."""
    from loraga_ray.jobs.demo import DEMO_BUDGETS, EARLY_EVERY, EARLY_UNTIL
    from loraga_ray.jobs.search import SearchOptions, search
    from loraga_ray.options import TrainOptions

    budget = DEMO_BUDGETS["demo-minilm"]
    with tempfile.TemporaryDirectory(prefix="trial-runner-") as tmp:
        space = Path(tmp) / "space.yaml"
        space.write_text("lr: 1.0e-3\n" if concurrent == 1 else f"lr: {{grid: {LRS[:concurrent]}}}\n")
        base = TrainOptions(model="demo-minilm", data=budget["data"], out=str(Path(tmp) / "s"), init="lora", rank=8,
                            alpha=16.0, max_steps=steps, batch_size=budget["batch_size"], max_length=budget["max_length"],
                            eval_every=steps, eval_samples=256, eval_early_every=EARLY_EVERY,
                            eval_early_until=min(EARLY_UNTIL, steps), seed=0, workers=1, device="cpu")
        t0 = time.perf_counter()
        res = search(base, SearchOptions(space=str(space), max_concurrent=concurrent, grace_period=steps,
                                         trial_runner=runner))
        search_s = time.perf_counter() - t0
        trials = []
        for row in sorted(res.rows, key=lambda r: -r["lr"]):
            metrics = json.loads((res.out / "trials" / row["trial_id"] / "metrics.json").read_text())
            history = metrics["history"]
            wall, loop = metrics["run"]["wall_s"], history[-1]["elapsed_s"]
            trials.append({"lr": row["lr"], "trial_wall_s": wall, "loop_s": loop, "startup_export_s": wall - loop,
                           "train_loss": [h["train_loss"] for h in history], "eval_loss": history[-1].get("eval_loss")})
    # per search: the median trial (one trial: that trial)
    med = {k: round(statistics.median(t[k] for t in trials), 2) for k in ("trial_wall_s", "loop_s", "startup_export_s")}
    return {"runner": runner, "steps": steps, "concurrent": concurrent, "search_s": round(search_s, 2), **med,
            "train_loss": [t["train_loss"] for t in trials] if concurrent > 1 else trials[0]["train_loss"],
            "eval_loss": trials[0]["eval_loss"], "trials": [{k: v for k, v in t.items() if k != "train_loss"} for t in trials]}


def report(data: dict, out: Path) -> str:
    rows, steps, concurrent = data["rows"], data["steps"], data.get("concurrent", 1)
    med = {r: {k: statistics.median(x[k] for x in rows if x["runner"] == r)
               for k in ("search_s", "trial_wall_s", "loop_s", "startup_export_s")} for r in RUNNERS}
    train, local = med["ray-train"], med["in-process"]
    same = all(a["train_loss"] == b["train_loss"] for a in rows for b in rows if a["runner"] != b["runner"])
    what = ("One MiniLM LoRA trial" if concurrent == 1 else
            f"{concurrent} MiniLM LoRA trials at once (lr {', '.join(f'{x:g}' for x in LRS[:concurrent])}; per search the median trial)")
    lines = [
        "# Search trials: a Ray Train run per trial, or the loop in the Tune trial",
        "",
        f"{what} ({steps} steps of 16, length 64, eval every 5 steps over the first "
        f"{min(40, steps)} and at the end, 256 eval examples) as one search, one torch thread per trial; "
        f"{data['repeats']} repeats per runner, interleaved, each in a fresh process. Machine: {data['machine']}.",
        "",
        "| runner | trial wall (median s) | training loop (s) | start-up and export (s) | whole search incl. Ray start (s) |",
        "|---|---|---|---|---|",
    ]
    for r in RUNNERS:
        m = med[r]
        lines.append(f"| {r} | {m['trial_wall_s']:.1f} | {m['loop_s']:.1f} | {m['startup_export_s']:.1f} | {m['search_s']:.1f} |")
    lines += [
        "",
        f"In-process: the trial's start-up and export {local['startup_export_s']:.1f} s against "
        f"{train['startup_export_s']:.1f} s ({train['startup_export_s'] - local['startup_export_s']:.1f} s less per trial, "
        f"x{train['startup_export_s'] / max(local['startup_export_s'], 1e-9):.1f}); the whole trial "
        f"{local['trial_wall_s'] / train['trial_wall_s']:.2f} of the Ray Train trial's wall time.",
        f"Per-step training losses of the two runners: {'identical in every repeat' if same else 'NOT identical'}.",
        "",
        "Per run (s): " + "; ".join(f"{x['runner']} {x['trial_wall_s']:.1f} = {x['loop_s']:.1f} loop + "
                                   f"{x['startup_export_s']:.1f}" for x in rows),
        "",
    ]
    text = "\n".join(lines)
    (out / f"{_name(concurrent)}.md").write_text(text)
    return text


def _name(concurrent: int) -> str:
    return "trial_runner" if concurrent == 1 else f"trial_runner_concurrent{concurrent}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="training steps per trial (start-up does not depend on them)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrent", type=int, default=1, help="trials at once in each search (at most 4)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--trial-runner", help=argparse.SUPPRESS)  # one measurement, in a fresh process
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.trial_runner:
        print(json.dumps(measure(args.trial_runner, args.steps, args.concurrent)))
        return 0
    if not args.report_only:
        rows = run_interleaved(__file__, ["--steps", str(args.steps), "--concurrent", str(args.concurrent)],
                               "--trial-runner", RUNNERS, args.repeats,
                               lambda r: f"trial {r['trial_wall_s']:.1f} s = loop {r['loop_s']:.1f} + "
                                         f"start-up/export {r['startup_export_s']:.1f}")
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{_name(args.concurrent)}.json").write_text(json.dumps(
            {"machine": machine(), "steps": args.steps, "repeats": args.repeats, "concurrent": args.concurrent,
             "rows": rows}, indent=1))
    print(report(json.loads((out / f"{_name(args.concurrent)}.json").read_text()), out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
