"""loraga-ray: LoRA-GA initialisation and fine-tuning, from one process to a Ray cluster.

Public API, usable in plain Python with no Ray cluster::

    art = estimate_init(model, batches, target_modules=None, max_rank=32)
    art.save("runs/init"); art = InitArtifact.load("runs/init")
    model = apply_lora_ga(model, art, rank=8, alpha=16)   # a peft.PeftModel
    save_adapter(model, "runs/adapter")                   # plain PEFT adapter for the original base

and the three jobs on Ray, each a function of its typed options (:mod:`loraga_ray.options`)::

    artifact, summary = run_init(InitOptions(model=..., data=..., out="runs/init"))
    metrics = fit(TrainOptions(model=..., data=..., out="runs/train"))
    result = search(TrainOptions(...), SearchOptions(space="tune_spaces/rank.yaml"), out="runs/search")

The jobs import Ray only when they are first used.
"""

from .core.adapters import apply_lora_ga, apply_lora_one, merge_adapter, save_adapter, save_merged
from .core.artifact import ArtifactError, InitArtifact
from .core.estimate import estimate_init
from .core.gradients import GradientError
from .core.storage import load_artifact, save_artifact
from .core.targets import QuantisedModelError, TargetError, find_target_modules
from .options import InitOptions, SearchOptions, TrainOptions

__version__ = "0.1.0"

_JOBS = {"run_init": "loraga_ray.jobs.init", "fit": "loraga_ray.jobs.train", "search": "loraga_ray.jobs.search"}


def __getattr__(name: str):
    if name in _JOBS:
        import importlib

        return getattr(importlib.import_module(_JOBS[name]), name)
    raise AttributeError(f"module 'loraga_ray' has no attribute {name!r}")


__all__ = [
    "estimate_init",
    "InitArtifact",
    "apply_lora_ga",
    "apply_lora_one",
    "save_adapter",
    "merge_adapter",
    "save_merged",
    "load_artifact",
    "save_artifact",
    "find_target_modules",
    "ArtifactError",
    "GradientError",
    "QuantisedModelError",
    "TargetError",
    "InitOptions",
    "TrainOptions",
    "SearchOptions",
    "run_init",
    "fit",
    "search",
]
