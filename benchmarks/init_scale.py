"""Replicated vs sharded init, N = 1, 2, 4 CPU workers (gloo): time per stage, what each worker
held, and what the driver received.

Each configuration runs in a fresh process (``run_init`` on an embedded local Ray, CPU workers),
interleaved over the repeats. Per worker it reads, from the run's summary, the tensor bytes of the
parameters and float32 sums it held and its peak RSS; the driver's bytes received are the sum of
``nbytes`` of every array it fetched from the workers (in the artifact's meta.json too).

    python benchmarks/init_scale.py                          # tiny LLaMA and SmolLM2-135M, 1 repeat
    python benchmarks/init_scale.py --models tiny-llama --repeats 3

Writes init_scale.json, init_scale.md and init_scale.png into --out (default benchmarks/results).
All workers share this machine's cores, so the times say what the sharded path costs in
collectives here, not what N GPUs would gain; the bytes are what they are anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, machine  # noqa: E402

MiB = 2**20


def tiny_llama(folder: Path) -> str:
    """A 4-layer LLaMA (hidden 64) with the SmolLM2 tokenizer, random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraga_ray.models import load_tokenizer

    if (folder / "config.json").exists():
        return str(folder)
    tok = load_tokenizer("demo-smollm2")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def run_one(args) -> dict:
    from loraga_ray import InitOptions, run_init
    from loraga_ray.core.artifact import FACTORS_FILE
    from loraga_ray.jobs.cluster import connect

    model = tiny_llama(Path(args.cache) / "tiny-llama") if args.run_model == "tiny-llama" else args.run_model
    connect(None, num_cpus=8, quiet=True)
    out = Path(tempfile.mkdtemp()) / "init"
    _, s = run_init(InitOptions(model=model, data="demo-arithmetic", out=str(out), num_samples=args.num_samples,
                                batch_size=args.batch_size, max_rank=args.max_rank, workers=args.run_workers,
                                gpus_per_worker=0, max_length=args.max_length, progress=False,
                                init_strategy=args.run_strategy))
    mem = s["memory_per_worker"]
    return {"model": args.run_model, "strategy": s["strategy"], "workers": args.run_workers,
            **{k: s[k] for k in ("start_s", "gradient_s", "reduce_s", "svd_s", "total_s", "num_tokens")},
            "param_mib_max": max(m["param_bytes"] for m in mem) / MiB,
            "sum_mib_max": max(m["sum_bytes"] for m in mem) / MiB,
            "peak_rss_mib_max": max(m["peak_rss_bytes"] for m in mem) / MiB,
            "driver_received_mib": s["driver_bytes_received"] / MiB,
            "factors_mib": os.path.getsize(out / FACTORS_FILE) / MiB}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny-llama,demo-smollm2")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--strategies", default="replicated,sharded")
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--max-rank", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "loraga-init-scale"))
    for hidden in ("--run-model", "--run-strategy"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--run-workers", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run_model:
        print(json.dumps(run_one(args)))
        return 0
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    common = ["--num-samples", str(args.num_samples), "--batch-size", str(args.batch_size), "--max-length",
              str(args.max_length), "--max-rank", str(args.max_rank), "--cache", args.cache]
    configs = [(m, s, int(w)) for m in args.models.split(",") for w in args.workers.split(",")
               for s in args.strategies.split(",")]
    rows = []
    for rep in range(args.repeats):
        for m, s, w in configs:
            proc = subprocess.run([sys.executable, __file__, *common, "--run-model", m, "--run-strategy", s,
                                   "--run-workers", str(w)], capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{m} {s} {w} failed")
            row = json.loads(proc.stdout.strip().splitlines()[-1]) | {"repeat": rep}
            rows.append(row)
            print(f"[{rep + 1}/{args.repeats}] {m} {s} x{w}: gradient {row['gradient_s']:.1f}s svd {row['svd_s']:.2f}s "
                  f"params {row['param_mib_max']:.1f} MiB sums {row['sum_mib_max']:.1f} MiB driver "
                  f"{row['driver_received_mib']:.2f} MiB", flush=True)
    keys = ("start_s", "gradient_s", "reduce_s", "svd_s", "total_s", "param_mib_max", "sum_mib_max", "peak_rss_mib_max",
            "driver_received_mib", "factors_mib")
    med = {}
    for m, s, w in configs:
        mine = [r for r in rows if (r["model"], r["strategy"], r["workers"]) == (m, s, w)]
        med[f"{m}|{s}|{w}"] = {k: statistics.median(r[k] for r in mine) for k in keys}
    text = machine()
    lines = ["# Init at scale: replicated vs sharded, CPU workers (gloo)", "",
             f"Machine: {text}; all workers share its cores. Medians of {args.repeats} repeat(s), each run a fresh "
             "process with an embedded Ray. demo-arithmetic, "
             f"{args.num_samples} samples in batches of {args.batch_size}, max length {args.max_length}, max rank "
             f"{args.max_rank} (k = {2 * args.max_rank}), randomized SVD.",
             f"Command: `python benchmarks/init_scale.py --models {args.models} --workers {args.workers} "
             f"--repeats {args.repeats}`", "",
             "Per worker: the largest tensor bytes of parameters and float32 sums any worker held, and the largest "
             "peak RSS. Driver: bytes of every array it fetched from the workers.", "",
             "| model | strategy | workers | start s | gradient s | reduce s | SVD s | params MiB/worker | sums MiB/worker "
             "| peak RSS MiB/worker | driver received MiB | factors file MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, v in med.items():
        m, s, w = key.split("|")
        lines.append(f"| {m} | {s} | {w} | {v['start_s']:.1f} | {v['gradient_s']:.1f} | {v['reduce_s']:.2f} | "
                     f"{v['svd_s']:.2f} | {v['param_mib_max']:.1f} | {v['sum_mib_max']:.2f} | {v['peak_rss_mib_max']:.0f} | "
                     f"{v['driver_received_mib']:.2f} | {v['factors_mib']:.2f} |")
    for m in args.models.split(","):
        for w in args.workers.split(","):
            r, sh = med.get(f"{m}|replicated|{w}"), med.get(f"{m}|sharded|{w}")
            if r and sh and int(w) > 1:
                lines.append(f"\n{m}, {w} workers: sharded holds {sh['param_mib_max'] / r['param_mib_max']:.2f}x the "
                             f"parameters and {sh['sum_mib_max'] / r['sum_mib_max']:.2f}x the sums per worker; the driver "
                             f"receives {sh['driver_received_mib'] / r['driver_received_mib']:.3f}x the bytes "
                             f"({sh['driver_received_mib'] / sh['factors_mib']:.2f}x the factors file); gradient stage "
                             f"{sh['gradient_s'] / r['gradient_s']:.2f}x the time.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "init_scale.json").write_text(json.dumps({"machine": text, "rows": rows, "medians": med}, indent=1))
    (out / "init_scale.md").write_text("\n".join(lines) + "\n")
    _plot(med, args, out / "init_scale.png")
    print("\n".join(lines))
    return 0


def _plot(med: dict, args, path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from loraga_ray.plots import figure

    models = args.models.split(",")
    with figure(path, figsize=(4.2 * len(models), 3.6), ncols=len(models), squeeze=False) as (fig, axes):
        for ax, m in zip(axes[0], models):
            for s, style in (("replicated", "o-"), ("sharded", "s--")):
                ws = [int(w) for w in args.workers.split(",") if f"{m}|{s}|{w}" in med]
                held = [med[f"{m}|{s}|{w}"]["param_mib_max"] + med[f"{m}|{s}|{w}"]["sum_mib_max"] for w in ws]
                drv = [med[f"{m}|{s}|{w}"]["driver_received_mib"] for w in ws]
                ax.plot(ws, held, style, label=f"{s}: per worker params + sums")
                ax.plot(ws, drv, style, alpha=0.5, label=f"{s}: driver received")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks([int(w) for w in args.workers.split(",")], [w for w in args.workers.split(",")])
            ax.set_xlabel("workers")
            ax.set_ylabel("MiB")
            ax.set_title(m, fontsize=9)
            ax.legend(fontsize=6)


if __name__ == "__main__":
    sys.exit(main())
