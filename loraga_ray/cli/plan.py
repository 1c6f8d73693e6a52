"""``loraga-ray plan``: each worker's memory for init and train, before anything runs."""

from __future__ import annotations

import json

HELP = "per-worker memory of init and train under each strategy, from the model's config alone"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="a model folder with config.json (no weights needed), or a demo model")
    p.add_argument("--gpus", type=int, required=True, help="GPUs (one worker each)")
    p.add_argument("--gpu-memory", required=True, help="memory of one GPU, e.g. 24GiB or 80GB")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="dtype of the base weights (default: bfloat16)")
    p.add_argument("--max-rank", type=int, default=32, help="largest rank the artifact serves (default: 32)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the training run (default: 8)")
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch of init, global batch of train (default: 8)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per example (default: 512)")
    p.add_argument("--task", choices=("seq-cls", "causal-lm"), default=None)
    p.add_argument("--target-modules", nargs="+", default=None, help="as for init and train (default: every Linear but the head)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="price training with activation checkpointing (as train --activation-checkpointing)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from ..options import split_names
    from ..planner import format_plan, plan

    p = plan(args.model, gpus=args.gpus, gpu_memory=args.gpu_memory, dtype=args.dtype, max_rank=args.max_rank,
             rank=args.rank, batch_size=args.batch_size, max_length=args.max_length, task=args.task,
             target_modules=split_names(args.target_modules), activation_checkpointing=args.activation_checkpointing)
    print(json.dumps(p, indent=2) if args.json else format_plan(p))
    return 0 if p["init"]["fits"] and p["train"]["fits"] else 3
