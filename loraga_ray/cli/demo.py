"""``loraga-ray demo``: LoRA-GA against plain LoRA on the offline demo model and data."""

from __future__ import annotations

import dataclasses

from ..options import DemoOptions
from .common import add_options, given_values

HELP = "the end-to-end demo: LoRA-GA vs LoRA on the offline demo model and data"


def add_arguments(p) -> None:
    add_options(p, DemoOptions, [f.name for f in dataclasses.fields(DemoOptions)])


def run(args) -> int:
    from ..jobs.demo import run_demo

    return run_demo(DemoOptions(**given_values(args, DemoOptions)))
