"""One GPU, one process, no Ray: the figures the scaling table needs, on a LLaMA-7B-shaped model.

Built from its config on the GPU in bf16 with random weights (throughput does not depend on the
values; no hub is needed), fed random token batches with every position supervised:

1. **limit**: a plain forward + backward of each batch with only the target weights requiring
   gradients, gradients dropped: what any gradient estimate must at least do. Tokens/s, peak memory.
2. **estimate**: ``loraga_ray.core.gradients.accumulate`` on the same batches (float32 sums of every
   target gradient). Tokens/s against the limit (goal >= 0.9x), peak memory.
3. **svd**: ``factorize`` of those sums on the GPU (randomized, k = 2 x max rank), and the same
   layers through ``sharded_svd`` in one process (the code path the sharded workers run).
4. **peft**: PEFT's ``preprocess_loraga`` on the same model and batches (its own accumulation),
   tokens/s and peak memory, when the installed PEFT has it.
5. **train**: LoRA-GA training steps (AdamW on the float32 LoRA factors, bf16 base, autocast) with
   and without activation checkpointing: tokens/s and peak memory.

    python benchmarks/gpu_scale.py --out $OUT                 # on the GPU machine (about 9 minutes)
    python benchmarks/gpu_scale.py --tiny --out /tmp/gpu      # a seconds-long check on CPU

Writes gpu_scale.json (and prints it). Each phase is timed after one warm-up batch, with
``torch.cuda.synchronize`` around the clock, and its peak is ``torch.cuda.max_memory_allocated``
after a reset (CPU: the tensors' bytes are not tracked, so peaks are None there).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(device):
    import torch

    return int(torch.cuda.max_memory_allocated()) if device.type == "cuda" else None


def timed(device, fn):
    _reset_peak(device)
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0, _peak(device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model on whatever device there is (a check)")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--max-rank", type=int, default=8)
    ap.add_argument("--train-steps", type=int, default=6)
    ap.add_argument("--skip", default="", help="comma-separated phases to leave out (limit, estimate, svd, peft, train)")
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    if args.tiny:
        args.samples, args.length, args.micro_batch, args.train_steps = min(args.samples, 8), min(args.length, 32), 2, 2

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraga_ray.core.estimate import factorize
    from loraga_ray.core.gradients import accumulate
    from loraga_ray.core.sharded_svd import sharded_svd
    from loraga_ray.core.targets import find_target_modules

    skip = set(filter(None, args.skip.split(",")))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    cfg = LlamaConfig(**(TINY if args.tiny else LLAMA_7B), pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.eval()
    build_s = time.perf_counter() - t0
    names = find_target_modules(model, None)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(0, args.samples, args.micro_batch):
        ids = torch.randint(3, cfg.vocab_size, (args.micro_batch, args.length), generator=g)
        batches.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                        "labels": ids.to(device)})
    tokens = sum(b["input_ids"].numel() for b in batches)
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "model": "tiny" if args.tiny else "llama-7b-shaped",
              "params": sum(p.numel() for p in model.parameters()),
              "target_params": sum(dict(model.named_modules())[n].weight.numel() for n in names),
              "samples": args.samples, "length": args.length, "micro_batch": args.micro_batch, "tokens": tokens,
              "build_s": round(build_s, 2), "weights_bytes": _peak(device)}
    print(json.dumps({"started": result}), flush=True)

    def only_targets_require_grad():
        for p in model.parameters():
            p.requires_grad_(False)
        modules = dict(model.named_modules())
        for n in names:
            modules[n].weight.requires_grad_(True)

    if "limit" not in skip:
        only_targets_require_grad()

        def limit():
            for b in batches:
                model(**b).loss.backward()
                for p in model.parameters():
                    p.grad = None

        model(**batches[0]).loss.backward()  # warm-up
        for p in model.parameters():
            p.grad = None
        s, peak = timed(device, limit)
        result["limit"] = {"seconds": round(s, 3), "tokens_per_s": round(tokens / s, 1), "peak_bytes": peak}
        print(json.dumps({"limit": result["limit"]}), flush=True)

    sums = None
    if "estimate" not in skip:
        box = {}
        s, peak = timed(device, lambda: box.update(sums=accumulate(model, batches, names, progress=False)))
        sums = box["sums"]
        result["estimate"] = {"seconds": round(s, 3), "tokens_per_s": round(tokens / s, 1), "peak_bytes": peak,
                              "sum_bytes": sum(t.numel() * 4 for t in sums.sums.values())}
        if "limit" in result:
            result["estimate"]["vs_limit"] = round(result["limit"]["seconds"] / s, 3)
        print(json.dumps({"estimate": result["estimate"]}), flush=True)

    if "svd" not in skip and sums is not None:
        k = 2 * args.max_rank
        sample = {n: sums.sums[n] for n in names[:7]}  # one block's targets through both paths
        s1, _ = timed(device, lambda: [sharded_svd(t / max(sums.num_targets, 1), k) for t in sample.values()])
        box = {}
        s, peak = timed(device, lambda: box.update(f=factorize(sums, k=k, device=device)))
        result["svd"] = {"seconds_all_layers": round(s, 3), "layers": len(names), "k": k, "peak_bytes": peak,
                         "sharded_svd_one_process_seconds_first_7": round(s1, 3)}
        del sums, box
        print(json.dumps({"svd": result["svd"]}), flush=True)

    if "peft" not in skip:
        try:
            from peft import LoraConfig
            from peft.tuners.lora import LoraGAConfig, preprocess_loraga

            config = LoraConfig(r=args.max_rank, lora_alpha=16, target_modules=[n.split(".")[-1] for n in names],
                                init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())
            for p in model.parameters():
                p.requires_grad_(False)

            def peft_step():
                def train_step():
                    for b in batches:
                        model(**b).loss.backward()
                preprocess_loraga(model, config, train_step)

            s, peak = timed(device, peft_step)
            result["peft_preprocess_loraga"] = {"seconds": round(s, 3), "tokens_per_s": round(tokens / s, 1),
                                                "peak_bytes": peak}
            for m in model.modules():  # drop what it attached
                if hasattr(m, "_peft_loraga_grad"):
                    del m._peft_loraga_grad
        except Exception as e:  # an older PEFT, or out of memory: recorded, the rest still runs
            result["peft_preprocess_loraga"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        for p in model.parameters():
            p.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps({"peft": result["peft_preprocess_loraga"]}), flush=True)

    if "train" not in skip:
        result["train"] = train_figures(model, names, batches, args, device)
        print(json.dumps({"train": result["train"]}), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_scale.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


def train_figures(model, names, batches, args, device) -> dict:
    """LoRA training steps over the bf16 base (LoRA-GA's init only changes the factors' values, not
    the step's cost), held as a Train worker holds it (``training.strategy.prepare``: trainable
    factors float32, autocast bf16), without and with activation checkpointing; beside each
    measured peak, the planner's prediction for one worker (DDP row) of the same run."""
    import torch
    from peft import LoraConfig, get_peft_model

    from loraga_ray.planner import shape_of, train_rows
    from loraga_ray.training.strategy import autocast_for, prepare

    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    config = LoraConfig(r=args.max_rank, lora_alpha=16, target_modules=[n.split(".")[-1] for n in names],
                        use_rslora=True)
    shape = shape_of(model, names)
    peft_model = get_peft_model(model, config)
    out = {}
    for checkpointing in (False, True):
        peft_model = prepare(peft_model, strategy="ddp", device=device, dtype="bfloat16",
                             activation_checkpointing=checkpointing, world=1)
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-5)
        peft_model.train()
        steps = batches[: args.train_steps + 1]
        autocast = autocast_for(device, "bfloat16")

        def step(b):
            with autocast():
                loss = peft_model(**b).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        key = "checkpointing" if checkpointing else "plain"
        row = train_rows(shape, 1, 0, "bfloat16", args.micro_batch, args.length, args.max_rank, checkpointing)[0]
        try:
            step(steps[0])  # warm-up (and AdamW's state)
            s, peak = timed(device, lambda: [step(b) for b in steps[1:]])
            toks = sum(b["input_ids"].numel() for b in steps[1:])
            out[key] = {"seconds": round(s, 3), "tokens_per_s": round(toks / s, 1), "peak_bytes": peak,
                        "predicted_bytes": row.per_worker_bytes, "predicted_parts": row.parts,
                        "predicted_over_measured": round(row.per_worker_bytes / peak, 3) if peak else None}
        except torch.OutOfMemoryError as e:
            out[key] = {"error": f"out of memory: {str(e)[:200]}", "predicted_bytes": row.per_worker_bytes}
            torch.cuda.empty_cache()
        del opt
    return out


if __name__ == "__main__":
    sys.exit(main())
