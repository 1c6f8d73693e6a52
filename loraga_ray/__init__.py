"""loraga-ray: LoRA-GA initialisation and fine-tuning, from one process to a Ray cluster.

Public API::

    art = estimate_init(model, batches, target_modules=None, max_rank=32)
    art.save("runs/init"); art = InitArtifact.load("runs/init")
    model = apply_lora_ga(model, art, rank=8, alpha=16)   # a peft.PeftModel
    save_adapter(model, "runs/adapter")                   # plain PEFT adapter for the original base
"""

from .adapters import apply_lora_ga, merge_adapter, save_adapter, save_merged
from .artifact import ArtifactError, InitArtifact
from .estimate import estimate_init
from .gradients import GradientError
from .targets import QuantisedModelError, TargetError, find_target_modules

__version__ = "0.1.0"

__all__ = [
    "estimate_init",
    "InitArtifact",
    "apply_lora_ga",
    "save_adapter",
    "merge_adapter",
    "save_merged",
    "find_target_modules",
    "ArtifactError",
    "GradientError",
    "QuantisedModelError",
    "TargetError",
]
