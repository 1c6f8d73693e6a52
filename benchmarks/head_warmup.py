"""Does fitting the new classifier head first (``--head-warmup-steps``) help, for every method alike?

Measured on MiniLM / rotten tomatoes at the convergence benchmark's budget (80 steps of 16,
length 64), every choice on the validation split and fixed here before any test result:

1. the warm-up itself (seed 0, no Ray, seconds): the head alone, encoder frozen, fitted on the
   estimate's sample (256 training examples, batches of 8) for each (steps, lr) of a small grid;
   the setting whose probe has the lowest validation loss is used from then on (ties: fewer steps);
   a best setting on the grid's largest steps or lr extends both once (the next points beyond),
   as the convergence benchmark's edge rule does;
2. every method of the convergence benchmark at seeds 0, 1, 2 with that warm-up (LoRA or full
   fine-tuning with it is LP-FT), each at the lr the convergence benchmark chose for it without
   one (read from results/convergence/minilm.json). LoRA-GA's and LoRA-One's artifact is
   estimated with the warm-up (its gradient goes through the fitted head); every other method
   fits the same head itself from the same sample before its own init; the runs without warm-up
   are the convergence benchmark's own (same code path, same seeds);
3. the rule, fixed before the runs: the warm-up becomes the default only if it raises the mean
   validation accuracy over the seeds of both methods by at least 1 point and lowers neither's
   mean validation loss; otherwise it stays off (opt-in);
4. test accuracy last, for the runs reported.

    python benchmarks/head_warmup.py                # ~30 min on 2 CPU cores
    python benchmarks/head_warmup.py --report-only  # table and plot from the saved JSON

Results: results/head_warmup_minilm.json, head_warmup_minilm.md, head_warmup_minilm_early.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import convergence as conv  # noqa: E402  the same searches, records and test evaluation

RESULTS = HERE / "results"
NAME = "head_warmup_minilm"
STEPS_GRID = [16, 32, 64, 128]
LR_GRID = [1e-3, 3e-3, 1e-2]
EDGE_STEPS, EDGE_LR = [256], [3e-2]  # the edge rule's one extension
METHODS = ["lora-ga", "lora", "lora-one", "pissa", "peft-lora-ga", "full"]
RULE_METHODS = ["lora-ga", "lora"]  # the default's rule looks at these two
PLOTTED = ["lora-ga", "lora", "full"]
SAMPLES, SAMPLE_BATCH = 256, 8  # the estimate's sample, as the convergence benchmark draws it


def _probe(exp: dict, steps_grid: list[int], lr_grid: list[float], seed: int = 0) -> list[dict]:
    """Stage 1: the head alone on frozen features, for every (steps, lr); validation loss/accuracy."""
    import torch
    import torch.nn.functional as F

    from loraga_ray.core.head import warm_up_head
    from loraga_ray.data import Encoder, iter_batches
    from loraga_ray.jobs.run_plan import _eval_table
    from loraga_ray.models import load_model, load_tokenizer, resolve_model
    from loraga_ray.options import TrainOptions
    from loraga_ray.training.build import estimate_batches

    torch.set_num_threads(2)
    spec = resolve_model(exp["model"])
    opts = TrainOptions(model=exp["model"], data=exp["data"], out="-", init_samples=SAMPLES, init_batch_size=SAMPLE_BATCH,
                        max_length=exp["max_length"], eval_samples=exp["eval_samples"], seed=seed)
    model = load_model(spec, task="seq-cls", num_labels=2, seed=seed)
    fresh = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    train = estimate_batches(opts, spec, "seq-cls")
    tok = load_tokenizer(spec)
    val_table, _ = _eval_table(opts)
    val = list(iter_batches(val_table, Encoder(tok, "seq-cls", exp["max_length"]), 64, tok.pad_token_id, "seq-cls"))

    def score() -> dict:
        model.eval()
        loss = correct = n = 0
        with torch.no_grad():
            for b in val:
                logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
                loss += float(F.cross_entropy(logits, b["labels"], reduction="sum"))
                correct += int((logits.argmax(-1) == b["labels"]).sum())
                n += len(b["labels"])
        return {"val_loss": loss / n, "val_accuracy": correct / n}

    rows = [dict(steps=0, lr=None, **score())]
    for steps in steps_grid:
        for lr in lr_grid:
            model.classifier.load_state_dict(fresh)
            t0 = time.perf_counter()
            stats = warm_up_head(model, train, ["classifier"], steps=steps, lr=lr)
            rows.append(dict(steps=steps, lr=lr, sample_loss_first=stats["loss_first"],
                             sample_loss_last=stats["loss_last"], seconds=time.perf_counter() - t0, **score()))
            print(f"[probe] {steps:4d} steps lr {lr:g}: val loss {rows[-1]['val_loss']:.4f} "
                  f"acc {rows[-1]['val_accuracy']:.4f} ({rows[-1]['seconds']:.1f}s)", flush=True)
    return rows


def run(work: Path) -> dict:
    from loraga_ray import InitOptions, run_init
    from loraga_ray.jobs.cluster import connect
    from loraga_ray.options import ARTIFACT_INITS

    exp = conv.EXPERIMENTS["minilm"]
    base = json.loads((RESULTS / "convergence" / "minilm.json").read_text())
    lrs = {m: base["chosen_lr"][m] for m in METHODS}
    path = RESULTS / f"{NAME}.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    record.update(settings={k: exp[k] for k in ("model", "data", "max_steps", "batch_size", "max_length",
                                                "eval_samples")},
                  lrs=lrs, seeds=exp["seeds"], steps_grid=STEPS_GRID, lr_grid=LR_GRID, machine=conv.platform.platform())
    record.setdefault("timings", {})
    if "probe" not in record:
        t0 = time.time()
        record["probe"] = _probe(exp, STEPS_GRID, LR_GRID)
        best = min((r for r in record["probe"] if r["steps"]), key=lambda r: (r["val_loss"], r["steps"]))
        if best["steps"] == max(STEPS_GRID) or best["lr"] == max(LR_GRID):
            print(f"[probe] best on the grid's edge: adding steps {EDGE_STEPS}, lr {EDGE_LR}", flush=True)
            steps_all, lrs_all = STEPS_GRID + EDGE_STEPS, LR_GRID + EDGE_LR
            record["probe"] += [r for r in _probe(exp, steps_all, lrs_all)
                                if r["steps"] and (r["steps"] in EDGE_STEPS or r["lr"] in EDGE_LR)]
            record["edge_extended"] = True
        record["timings"]["probe_s"] = time.time() - t0
    warm = [r for r in record["probe"] if r["steps"]]
    best = min(warm, key=lambda r: (r["val_loss"], r["steps"]))
    record["chosen"] = {"steps": best["steps"], "lr": best["lr"]}
    print(f"[probe] chosen: {best['steps']} steps at lr {best['lr']:g} (val loss {best['val_loss']:.4f})", flush=True)
    _save(record)

    connect(None, num_cpus=8, quiet=True)
    over = dict(head_warmup_steps=best["steps"], head_warmup_lr=best["lr"])
    runs = record.setdefault("runs", [])
    done = {(r["config"]["init"], r["config"]["seed"]) for r in runs}
    for seed in exp["seeds"]:
        art = work / f"init_seed{seed}"
        if not (art / "meta.json").exists():
            t0 = time.time()
            run_init(InitOptions(model=exp["model"], data=exp["data"], out=str(art), num_samples=SAMPLES,
                                 batch_size=SAMPLE_BATCH, max_rank=conv.RANK, max_length=exp["max_length"], seed=seed,
                                 **over))
            record["timings"][f"init_seed{seed}_s"] = time.time() - t0
        for m in METHODS:
            if (m, seed) in done:
                continue
            t0 = time.time()
            res = conv._search(exp, work / f"{m}_seed{seed}", m, {"lr": lrs[m]}, str(art) if m in ARTIFACT_INITS else None,
                               seed=seed, **over)
            for row, trial_out in conv._rows_with_outputs(res):
                rec = conv._trial_record(exp, trial_out, dict(row, seed=seed), "test_accuracy")
                rec["config"].update(over)
                runs.append(rec)
            record["timings"][f"{m}_seed{seed}_s"] = time.time() - t0
            _save(record)
    # the rule (fixed above), on validation only
    without = [r for r in base["runs"] if r["stage"] in ("lr", "seeds") and r["config"].get("head_lr") is None
               and r["config"]["init"] in METHODS and conv._same(r["config"]["lr"], lrs[r["config"]["init"]])]
    record["without"] = without
    gains = {}
    for m in RULE_METHODS:
        w = [r for r in runs if r["config"]["init"] == m]
        wo = [r for r in without if r["config"]["init"] == m]
        gains[m] = {"accuracy": statistics.mean(r["val"]["eval_accuracy"] for r in w)
                    - statistics.mean(r["val"]["eval_accuracy"] for r in wo),
                    "loss": statistics.mean(r["val"]["eval_loss"] for r in w) - statistics.mean(r["val"]["eval_loss"] for r in wo)}
    record["validation_gain"] = gains
    record["default_on"] = all(g["accuracy"] >= 0.01 and g["loss"] <= 0 for g in gains.values())
    # test, last
    for r in runs:
        conv._attach_test(exp, r)
    _save(record)
    return record


def _save(record: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(record, indent=1, default=float))


def _ms(values) -> str:
    values = list(values)
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def _eval_at(run: dict, step: int):
    return next((h["eval_loss"] for h in run["history"] if h["step"] == step and h.get("eval_loss") is not None), None)


def report(record: dict) -> str:
    from loraga_ray.curves import collapsed

    c = record["chosen"]
    lines = ["# Head warm-up (`--head-warmup-steps`) on MiniLM / rotten tomatoes", "",
             f"Settings: {record['settings']}; seeds {record['seeds']}; machine {record['machine']}.", "",
             "## 1. The warm-up alone (seed 0, encoder frozen, validation)", "",
             "| steps | lr | sample loss first → last | val loss | val accuracy | seconds |", "|---|---|---|---|---|---|"]
    for r in record["probe"]:
        if not r["steps"]:
            lines.append(f"| 0 (fresh head) | – | – | {r['val_loss']:.4f} | {r['val_accuracy']:.4f} | – |")
        else:
            lines.append(f"| {r['steps']} | {r['lr']:g} | {r['sample_loss_first']:.3f} → {r['sample_loss_last']:.3f} | "
                         f"{r['val_loss']:.4f} | {r['val_accuracy']:.4f} | {r['seconds']:.1f} |")
    lines += ["", f"Chosen by the lowest validation loss: **{c['steps']} steps at lr {c['lr']:g}**"
              + (" (the first grid's best was on its edge, so it was extended once)" if record.get("edge_extended") else "")
              + ".", "",
              "## 2. Fine-tuning from it, every method with the same warm-up", "",
              "Each method at the lr the convergence benchmark chose for it without a warm-up "
              f"({', '.join(f'{m} {v:g}' for m, v in record['lrs'].items())}); the runs without one are that "
              "benchmark's (the same code path and seeds).", "",
              "| method | warm-up | val accuracy | val loss | eval loss at step 5 / 10 / 20 / 40 | final train loss | "
              "test accuracy | collapsed |", "|---|---|---|---|---|---|---|---|"]
    for m in METHODS:
        for label, rs in (("none", [r for r in record.get("without", []) if r["config"]["init"] == m]),
                          (f"{c['steps']} @ {c['lr']:g}", [r for r in record.get("runs", []) if r["config"]["init"] == m])):
            if not rs:
                continue
            early = " / ".join(f"{statistics.mean(x):.3f}" if x else "–" for x in
                               ([v for v in (_eval_at(r, s) for r in rs) if v is not None] for s in (5, 10, 20, 40)))
            tests = [r["test"]["test_accuracy"] for r in rs if "test" in r]
            lines.append(f"| {conv.LABELS[m]} | {label} | {_ms(r['val']['eval_accuracy'] for r in rs)} | "
                         f"{_ms(r['val']['eval_loss'] for r in rs)} | {early} | {_ms(r['final_train_loss'] for r in rs)} | "
                         f"{_ms(tests) if tests else '–'} | {sum(collapsed(r['history']) for r in rs)}/{len(rs)} |")
    if "validation_gain" in record:
        g = record["validation_gain"]
        lines += ["", "Validation change with the warm-up (mean over seeds): " + "; ".join(
            f"{conv.LABELS[m]} accuracy {v['accuracy'] * 100:+.1f} pt, loss {v['loss']:+.3f}" for m, v in g.items()) + ".",
            f"Rule (fixed before the runs): on by default only if LoRA-GA and LoRA both gain ≥ 1 pt of validation accuracy and neither's "
            f"validation loss rises. Result: **{'on' if record['default_on'] else 'off'} by default**."]
    t = record.get("timings", {})
    trials = [v for k, v in t.items() if "_seed" in k and not k.startswith("init_")]
    inits = [v for k, v in t.items() if k.startswith("init_seed")]
    if trials:
        lines += ["", f"Time (one trial at a time): the probe {t.get('probe_s', 0):.0f} s; {len(inits)} estimates with the "
                  f"warm-up, median {statistics.median(inits):.0f} s; {len(trials)} trials, median "
                  f"{statistics.median(trials):.0f} s each (start-up, 80 steps, evaluations and export); "
                  f"{sum(trials) + sum(inits) + t.get('probe_s', 0):.0f} s in all."]
    return "\n".join(lines) + "\n"


def plot(record: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in PLOTTED:
        for label, rs, style in (("no warm-up", [r for r in record.get("without", []) if r["config"]["init"] == m], "--"),
                                 ("head warm-up", [r for r in record.get("runs", []) if r["config"]["init"] == m], "-")):
            steps = sorted({h["step"] for r in rs for h in r["history"] if h.get("eval_loss") is not None})
            ys = [statistics.mean(v for v in (_eval_at(r, s) for r in rs) if v is not None) for s in steps]
            if steps:
                ax.plot(steps, ys, style, color=conv.COLORS[m], marker="o", ms=3,
                        label=f"{conv.LABELS[m].strip('*')} ({label})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (mean over seeds)")
    ax.set_title("Head warm-up: validation loss, MiniLM / rotten tomatoes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{NAME}_early.png", dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/loraga-head-warmup", help="where the runs go (resumable)")
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args(argv)
    if a.report_only:
        record = json.loads((RESULTS / f"{NAME}.json").read_text())
    else:
        t0 = time.time()
        record = run(Path(a.work))
        record["timings"]["last_session_s"] = time.time() - t0
        _save(record)
    (RESULTS / f"{NAME}.md").write_text(report(record))
    plot(record)
    print(report(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
