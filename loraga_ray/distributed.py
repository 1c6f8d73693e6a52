"""Distributed LoRA-GA gradient estimate on Ray (work in progress: the contract first)."""

from __future__ import annotations

from dataclasses import dataclass

from .artifact import InitArtifact


@dataclass
class InitOptions:
    """Everything `loraga-ray init` needs; the CLI flags map one to one."""

    model: str
    data: str
    out: str | None = None
    num_samples: int = 256
    batch_size: int = 8
    max_rank: int = 32
    workers: int = 1
    gpus_per_worker: float | None = None  # None: 1 if the cluster has GPUs, else 0
    seed: int = 0
    svd: str = "randomized"
    max_length: int = 128
    split: str = "train"
    task: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    target_modules: list[str] | None = None
    address: str | None = None
    progress: bool = True


def run_init(opts: InitOptions) -> tuple[InitArtifact, dict]:
    """Estimate the LoRA-GA init on Ray; writes ``opts.out`` if given and returns
    ``(artifact, summary)``."""
    raise NotImplementedError("distributed init is being implemented")
