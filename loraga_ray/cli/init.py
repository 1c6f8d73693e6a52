"""``loraga-ray init``: the distributed gradient estimate + SVD -> an init artifact."""

from __future__ import annotations

import json
from pathlib import Path

from ..options import InitOptions
from .common import add_option, add_options, given_values

HELP = "estimate the LoRA-GA init (distributed gradient estimate + SVD) and write the artifact"


def add_arguments(p) -> None:
    g = p.add_argument_group("what to estimate")
    add_option(g, InitOptions, "model", required=True)
    add_option(g, InitOptions, "data", required=True)
    add_option(g, InitOptions, "out", required=True)
    add_option(g, InitOptions, "overwrite")
    add_options(g, InitOptions, ("split", "task", "text_column", "label_column", "prompt_column", "response_column",
                                 "num_labels", "target_modules", "allow_pickle_weights"))
    g = p.add_argument_group("the estimate")
    add_options(g, InitOptions, ("num_samples", "batch_size", "max_rank", "seed", "svd", "max_length", "dtype",
                                 "head_warmup_steps", "head_warmup_lr"))
    g = p.add_argument_group("cluster")
    add_options(g, InitOptions, ("workers", "init_strategy", "gpus_per_worker", "cpus_per_worker", "address", "max_retries",
                                 "stall_timeout", "resource_timeout", "progress"))
    g.add_argument("--summary-json", default=None, help="also write the run summary to this JSON file")


def run(args) -> int:
    from ..jobs.init import format_summary, run_init

    _, summary = run_init(InitOptions(**given_values(args, InitOptions)))
    print(format_summary(summary))
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2))
    return 0
