"""Training memory and step time per worker: DDP against FSDP, float32 against a bfloat16 base,
with and without activation checkpointing, on 1 and 2 CPU workers (gloo), beside the planner's
prediction for each.

Each configuration runs in fresh processes (one per worker, ``torch.multiprocessing`` + gloo, no
Ray: the Train worker's own code without its start-up) that build the model as a Train worker
does (``training.build.build_model`` then ``training.strategy.prepare``), take one warm-up step and
``--steps`` timed AdamW steps of random token batches (every position supervised). The adapter is
PEFT's default LoRA at ``--rank`` on every Linear: LoRA-GA's init changes the factors' values, not
their shapes, so memory and time are the same.

Measured per worker:
* ``param_bytes``: the parameters it holds (its shards under FSDP), exact;
* ``peak_bytes``: the peak resident memory during the steps (VmHWM, reset after the model is built)
  minus the process's resident memory before the model was built. The same worker first runs the
  same configuration on a micro model of the same architecture, so the library pages and kernels
  the steps touch are resident before the baseline is read, and glibc is told to return every
  allocation over 64 KiB to the system (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the
  figure: what remains is the tensors, plus allocator and gloo overheads;
* ``step_s``: the median step time.

    python benchmarks/train_scale.py                       # tiny LLaMA and SmolLM2-135M (about 10 min)
    python benchmarks/train_scale.py --models tiny --steps 2   # a quick check

Writes benchmarks/results/train_scale.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY_LLAMA = dict(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, tie_word_embeddings=False)


def _rss(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _steps(path: str, cfg: dict, world: int, rank: int, measure: bool) -> dict:
    """Build the model at ``path`` as a Train worker does and take the steps; with ``measure``,
    the resident-memory peak above the process before the build."""
    import torch

    from loraga_ray.models import resolve_model
    from loraga_ray.options import TrainOptions
    from loraga_ray.training.build import build_model
    from loraga_ray.training.strategy import autocast_for, full_tensor, parameter_bytes, prepare

    rss0 = _rss()
    opts = TrainOptions(model=path, data="unused", out="unused", init="lora", rank=cfg["rank"], alpha=16.0, seed=0)
    model = build_model(opts, resolve_model(path, "causal-lm"), "causal-lm", 2, None, dtype=cfg["dtype"])
    model = prepare(model, strategy=cfg["strategy"], device=torch.device("cpu"), dtype=cfg["dtype"],
                    activation_checkpointing=cfg["checkpointing"], world=world)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    autocast = autocast_for(torch.device("cpu"), cfg["dtype"])
    g = torch.Generator().manual_seed(rank)
    batches = [torch.randint(3, cfg["vocab"], (cfg["batch"], cfg["length"]), generator=g)
               for _ in range(cfg["steps"] + 1)]
    _reset_peak()
    times = []
    for i, ids in enumerate(batches):
        t0 = time.perf_counter()
        model.train()
        with autocast():
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        full_tensor(torch.nn.utils.clip_grad_norm_(params, 1.0))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if world > 1:
            torch.distributed.barrier()
        if i > 0:
            times.append(time.perf_counter() - t0)
    out = {"rank": rank, "param_bytes": parameter_bytes(model), "peak_bytes": int(_rss("VmHWM") - rss0),
           "step_s": statistics.median(times), "loss": float(loss.detach())}
    del model, opt, params, loss
    return out


def _worker(rank: int, world: int, port: int, cfg: dict, queue) -> None:
    import gc

    import torch

    torch.set_num_threads(cfg["threads"])
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    # the same run on a micro model of the same architecture first: it loads every library page and
    # kernel the steps touch, so the measured peak below is the model's memory, not the runtime's
    _steps(cfg["micro_path"], dict(cfg, steps=1), world, rank, measure=False)
    gc.collect()
    queue.put(_steps(cfg["model_path"], cfg, world, rank, measure=True))
    if world > 1:
        torch.distributed.destroy_process_group()


def run_config(cfg: dict) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the spawned workers
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    world = cfg["workers"]
    procs = [ctx.Process(target=_worker, args=(r, world, port, cfg, queue)) for r in range(world)]
    for p in procs:
        p.start()
    rows = [queue.get(timeout=1800) for _ in range(world)]
    for p in procs:
        p.join(timeout=120)
    return {"per_worker": sorted(rows, key=lambda r: r["rank"])}


def predicted(model_path: str, cfg: dict) -> dict:
    from loraga_ray.planner import model_shape, train_rows

    shape = model_shape(model_path, "causal-lm")
    rows = {r.strategy: r for r in train_rows(shape, cfg["workers"], 0, cfg["dtype"], cfg["batch"] * cfg["workers"],
                                              cfg["length"], cfg["rank"], cfg["checkpointing"])}
    row = rows.get(cfg["strategy"]) or rows["ddp"]
    return {"bytes": row.per_worker_bytes, "parts": row.parts}


def model_folder(name: str, tmp: Path) -> tuple[str, str]:
    """(the model, a micro model of its architecture): the tiny LLaMA built from its config, or the
    shipped SmolLM2-135M."""
    import torch
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    from loraga_ray.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("demo-smollm2"))  # a model folder needs one
    if name == "tiny":
        torch.manual_seed(0)
        path = tmp / "tiny-llama"
        LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(path)
        tokenizer.save_pretrained(path)
        config = LlamaConfig(**TINY_LLAMA)
    else:
        from loraga_ray.models import _pretrained_kwargs

        spec = resolve_model("demo-smollm2")
        path = "demo-smollm2"  # (a GGUF file, dequantised on load)
        config = AutoConfig.from_pretrained(spec.path, **_pretrained_kwargs(spec))
    micro = tmp / f"micro-{name}"
    small = config.to_dict() | dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, vocab_size=config.vocab_size)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in small.items() if k not in ("architectures",)})).save_pretrained(micro)
    tokenizer.save_pretrained(micro)
    return str(path), str(micro)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--batch", type=int, default=4, help="examples per worker per step")
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)

    import subprocess

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path, micro = model_folder(name, Path(tmp))
            from transformers import AutoConfig

            vocab = AutoConfig.from_pretrained(micro).vocab_size
            for workers in (1, 2):
                for strategy in (("ddp",) if workers == 1 else ("ddp", "fsdp")):
                    for dtype in ("float32", "bfloat16"):
                        for checkpointing in (False, True):
                            cfg = dict(model=name, model_path=path, micro_path=micro, workers=workers, strategy=strategy, dtype=dtype,
                                       checkpointing=checkpointing, batch=args.batch, length=args.length,
                                       rank=args.rank, steps=args.steps, threads=args.threads, vocab=vocab)
                            t0 = time.perf_counter()
                            measured = run_config(cfg)
                            pred = predicted(path, cfg)
                            peak = max(r["peak_bytes"] for r in measured["per_worker"])
                            row = {k: v for k, v in cfg.items() if not k.endswith("_path")} | measured | {
                                "predicted_bytes": pred["bytes"], "predicted_parts": pred["parts"],
                                "peak_bytes": peak,
                                "param_bytes": max(r["param_bytes"] for r in measured["per_worker"]),
                                "step_s": statistics.median(r["step_s"] for r in measured["per_worker"]),
                                "predicted_over_measured": round(pred["bytes"] / peak, 3) if peak > 0 else None,
                                "wall_s": round(time.perf_counter() - t0, 1)}
                            results.append(row)
                            print(json.dumps({k: row[k] for k in ("model", "workers", "strategy", "dtype",
                                                                  "checkpointing", "param_bytes", "peak_bytes",
                                                                  "predicted_bytes", "step_s")}), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"commit": commit, "cpus": os.cpu_count(), "batch_per_worker": args.batch, "length": args.length,
            "rank": args.rank, "steps": args.steps, "threads_per_worker": args.threads}
    (out / "train_scale.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    (out / "train_scale.md").write_text(table(meta, results))
    plot(results, out / "train_scale.png")
    print(table(meta, results))
    return 0


def table(meta: dict, rows: list[dict]) -> str:
    mib = 2**20
    lines = [f"# Training memory and step time per worker (CPU, gloo; commit {meta['commit']})", "",
             f"{meta['cpus']} CPUs, {meta['threads_per_worker']} torch thread(s) per worker; {meta['batch_per_worker']} "
             f"examples x {meta['length']} tokens per worker per step, LoRA rank {meta['rank']} on every Linear, median "
             f"of {meta['steps']} AdamW steps after a warm-up. `peak` is the resident-memory peak during the steps "
             "above the process before the model was built; `predicted` is `loraga-ray plan`'s row for the same run.",
             "", "| model | N | strategy | base dtype | checkpointing | params held | peak | predicted | pred/peak | "
             "step s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['predicted_over_measured']:.2f}" if r["predicted_over_measured"] else "-"
        lines.append(f"| {r['model']} | {r['workers']} | {r['strategy']} | {r['dtype']} | "
                     f"{'yes' if r['checkpointing'] else 'no'} | {r['param_bytes'] / mib:.1f} MiB | "
                     f"{r['peak_bytes'] / mib:.1f} MiB | {r['predicted_bytes'] / mib:.1f} MiB | {ratio} | "
                     f"{r['step_s']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, m in zip(axes[0], models):
        sub = [r for r in rows if r["model"] == m]
        labels = [f"N{r['workers']} {r['strategy']}\n{'bf16' if r['dtype'] == 'bfloat16' else 'fp32'}"
                  f"{' ckpt' if r['checkpointing'] else ''}" for r in sub]
        x = range(len(sub))
        ax.bar([i - 0.2 for i in x], [r["peak_bytes"] / 2**20 for r in sub], width=0.4, label="measured peak")
        ax.bar([i + 0.2 for i in x], [r["predicted_bytes"] / 2**20 for r in sub], width=0.4, label="planner")
        ax.set_xticks(list(x), labels, rotation=90, fontsize=7)
        ax.set_ylabel("MiB per worker")
        ax.set_title(m)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
