"""Cost of the LoRA-GA init: loraga-ray against PEFT's built-in lora_ga and the plain passes.

Each variant runs in a fresh subprocess (so peak RSS is its own), on the same model, sample and
batches; variants are interleaved over several repeats and medians are reported, because this
machine is shared and noisy. Variants:

* ``limit``      one forward+backward per batch with gradients on the target weights only
                 (the floor any gradient estimate pays)
* ``train_step`` a plain full fine-tuning step per batch (all weights, AdamW): the training
                 throughput the estimate is compared with
* ``ours``       loraga_ray.estimate_init (randomized SVD) + apply_lora_ga
* ``peft``       peft.preprocess_loraga + get_peft_model(init_lora_weights="lora_ga")

    python benchmarks/init_cost.py                 # demo-minilm, 256 samples, batches of 8, r=8
    python benchmarks/init_cost.py --repeats 5 --out benchmarks/results

Writes ``init_cost.json`` (every measurement), ``init_cost.md`` (medians and ratios) and
``init_cost.png`` into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine, parser, peak_rss_mb, rss_mb, run_interleaved  # noqa: E402

VARIANTS = ("limit", "train_step", "ours", "peft")


def _prepare(args):
    import torch

    from loraga_ray.data import Encoder, collate, load_split, sample_table
    from loraga_ray.models import load_model, load_tokenizer, resolve_model

    spec = resolve_model(args.model)
    tok = load_tokenizer(spec)
    table = sample_table(load_split(args.data, "train"), args.num_samples, args.seed)
    enc = Encoder(tok, spec.task, max_length=args.max_length)
    batches = []
    for i in range(0, table.num_rows, args.batch_size):
        rows = table.slice(i, args.batch_size).to_pydict()
        import numpy as np

        encoded = enc({k: np.array(v, dtype=object) for k, v in rows.items()})
        batches.append(collate(encoded, tok.pad_token_id, spec.task))
    torch.manual_seed(0)
    model = load_model(spec, seed=0)
    return model, batches, spec


def run_one(args) -> dict:
    """Runs one variant in this process and returns its measurements."""
    import torch

    torch.set_num_threads(args.threads)
    model, batches, spec = _prepare(args)
    from loraga_ray import find_target_modules

    names = find_target_modules(model)
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    n_examples = sum(int(b["input_ids"].shape[0]) for b in batches)
    base_rss = rss_mb()
    out = {"variant": args.variant, "examples": n_examples, "tokens": n_tokens, "targets": len(names)}
    t0 = time.perf_counter()
    if args.variant == "limit":
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        mods = dict(model.named_modules())
        for n in names:
            mods[n].weight.requires_grad_(True)
        for b in batches:
            model(**b).loss.backward()
    elif args.variant == "train_step":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        for b in batches:
            opt.zero_grad(set_to_none=True)
            model(**b).loss.backward()
            opt.step()
    elif args.variant == "ours":
        from loraga_ray import apply_lora_ga, estimate_init

        art = estimate_init(model, batches, target_modules=names, max_rank=args.rank, svd="randomized")
        t_est = time.perf_counter()
        apply_lora_ga(model, art, rank=args.rank, alpha=args.alpha)
        out["gradient_s"] = art.meta["timings"]["gradient_s"]
        out["svd_s"] = art.meta["timings"]["svd_s"]
        out["apply_s"] = time.perf_counter() - t_est
    elif args.variant == "peft":
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraGAConfig, preprocess_loraga

        cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=names, use_rslora=True,
                         init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(), task_type="SEQ_CLS")

        def train_step():
            for b in batches:
                model(**b).loss.backward()

        preprocess_loraga(model, cfg, train_step)
        t_est = time.perf_counter()
        get_peft_model(model, cfg)
        out["gradient_s"] = t_est - t0
        out["apply_s"] = time.perf_counter() - t_est  # includes PEFT's SVD
    else:
        raise ValueError(args.variant)
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = peak_rss_mb()
    out["base_rss_mb"] = base_rss
    out["examples_per_s"] = n_examples / out.get("gradient_s", out["seconds"])
    out["tokens_per_s"] = n_tokens / out.get("gradient_s", out["seconds"])
    return out


def _summarise(rows: list[dict]) -> dict:
    by = {}
    for v in VARIANTS:
        rs = [r for r in rows if r["variant"] == v]
        if not rs:
            continue
        med = lambda k: statistics.median(r[k] for r in rs if k in r)  # noqa: E731
        by[v] = {"n": len(rs), "seconds": med("seconds"), "peak_rss_mb": med("peak_rss_mb"),
                 "extra_rss_mb": statistics.median(r["peak_rss_mb"] - r["base_rss_mb"] for r in rs),
                 "examples_per_s": med("examples_per_s"), "tokens_per_s": med("tokens_per_s")}
        if v in ("ours", "peft"):
            by[v]["gradient_s"] = med("gradient_s")
            by[v]["apply_s"] = med("apply_s")
        if v == "ours":
            by[v]["svd_s"] = med("svd_s")
            by[v]["svd_share"] = statistics.median(r["svd_s"] / r["seconds"] for r in rs)
    return by


def _table(by: dict, args, machine: str) -> str:
    lines = [
        f"# Init cost: {args.model}, {args.num_samples} samples in batches of {args.batch_size}, max length "
        f"{args.max_length}, r={args.rank}, all Linears except the head",
        "",
        f"Machine: {machine}. Medians of {args.repeats} interleaved repeats, each variant in a fresh process.",
        f"Command: `python benchmarks/init_cost.py --repeats {args.repeats}`",
        "",
        "| variant | wall s | peak RSS MB | RSS above loaded model MB | examples/s | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for v, s in by.items():
        lines.append(f"| {v} | {s['seconds']:.2f} | {s['peak_rss_mb']:.0f} | {s['extra_rss_mb']:.0f} | "
                     f"{s['examples_per_s']:.1f} | {s['tokens_per_s']:.0f} |")
    if "ours" in by and "peft" in by:
        o, p = by["ours"], by["peft"]
        lines += ["", "| ratio | value | goal |", "|---|---|---|",
                  f"| ours / PEFT wall time | {o['seconds'] / p['seconds']:.2f} | <= 1.0 |",
                  f"| ours / PEFT peak RSS | {o['peak_rss_mb'] / p['peak_rss_mb']:.2f} | <= 1.0 |",
                  f"| ours / PEFT RSS above loaded model | {o['extra_rss_mb'] / max(p['extra_rss_mb'], 1e-9):.2f} | |"]
        if "train_step" in by:
            lines.append(f"| ours gradient throughput / training step throughput | "
                         f"{o['examples_per_s'] / by['train_step']['examples_per_s']:.2f} | >= 0.9 |")
        if "limit" in by:
            lines.append(f"| ours init time / limit (fwd+bwd on targets) | {o['seconds'] / by['limit']['seconds']:.2f} | <= 1.1 |")
            lines.append(f"| PEFT init time / limit | {p['seconds'] / by['limit']['seconds']:.2f} | |")
        lines.append(f"| ours SVD share of init time | {o['svd_share']:.1%} | <= 10% |")
    return "\n".join(lines) + "\n"


def _plot(by: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    names = list(by)
    axes[0].bar(names, [by[n]["seconds"] for n in names], color=["#999", "#bbb", "#1f77b4", "#ff7f0e"][: len(names)])
    axes[0].set_ylabel("wall time (s, median)")
    axes[1].bar(names, [by[n]["peak_rss_mb"] for n in names], color=["#999", "#bbb", "#1f77b4", "#ff7f0e"][: len(names)])
    axes[1].set_ylabel("peak RSS (MB, median)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=15)
    fig.suptitle("LoRA-GA init cost: loraga-ray vs PEFT lora_ga")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = ap.parse_args(argv)
    if args.variant:
        print(json.dumps(run_one(args)))
        return 0
    argv = list(argv if argv is not None else sys.argv[1:])
    rows = run_interleaved(__file__, argv, "--variant", args.variants.split(","), args.repeats,
                           lambda r: f"{r['seconds']:6.2f} s  peak {r['peak_rss_mb']:.0f} MB")
    by = _summarise(rows)
    import torch

    machine_text = f"{machine()}, {torch.get_num_threads()} threads"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "init_cost.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "variant"},
                                                    "machine": machine_text, "rows": rows, "medians": by}, indent=2))
    table = _table(by, args, machine_text)
    (out / "init_cost.md").write_text(table)
    _plot(by, out / "init_cost.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
