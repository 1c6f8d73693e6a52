"""How a Train worker holds the model: the base's dtype, activation checkpointing, and DDP or FSDP2.

* **dtype**: the frozen base weights are kept in ``dtype`` (bfloat16 halves them); every
  parameter that trains (LoRA factors, new heads, or everything under full fine-tuning) is
  float32, so the optimizer updates float32 master copies. The forward runs under autocast in
  ``dtype`` (nothing to cast in float32).
* **activation checkpointing**: transformers' gradient checkpointing (non-reentrant
  ``torch.utils.checkpoint`` around each block), which composes with PEFT, DDP and FSDP2.
* **ddp**: every worker holds the whole model; gradients are averaged by DDP.
* **fsdp**: FSDP2 ``fully_shard`` on each repeated transformer block, then on the root, over all
  workers. Every parameter becomes a DTensor shard of its dim 0 (1/N per worker); a block's full
  weights exist only while it runs. Frozen and trainable parameters share a unit (FSDP2 shards
  per parameter and reduces only the gradients that exist); with a 16-bit ``dtype`` the
  all-gather casts to it (``MixedPrecisionPolicy(param_dtype=dtype)``) and gradients are
  reduced in float32.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..core.sharded import full_tensor, local_tensor

__all__ = ["TORCH_DTYPES", "StrategyError", "resolve_dtype", "autocast_for", "full_tensor", "local_tensor", "set_dtypes",
           "hf_model", "enable_activation_checkpointing", "shard", "prepare", "parameter_bytes"]

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StrategyError(ValueError):
    """The asked strategy cannot hold this model (the message says what to use instead)."""


def resolve_dtype(name: str, cuda: bool, bf16: bool = True) -> str:
    """``auto``: float32 on CPU, bfloat16 on CUDA (float16 on GPUs without bfloat16)."""
    if name != "auto":
        return name
    if not cuda:
        return "float32"
    return "bfloat16" if bf16 else "float16"


def autocast_for(device: torch.device, dtype: str):
    """The autocast context of the forward (a no-op context factory for float32)."""
    if dtype == "float32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=TORCH_DTYPES[dtype])


def set_dtypes(model: nn.Module, dtype: str) -> None:
    """Frozen parameters in ``dtype``, trainable ones in float32 (the master copies)."""
    frozen = TORCH_DTYPES[dtype]
    for p in model.parameters():
        want = torch.float32 if p.requires_grad else frozen
        if p.is_floating_point() and p.dtype != want:
            p.data = p.data.to(want)


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT model (or the model itself)."""
    if hasattr(model, "peft_config"):
        return model.base_model.model
    return model


def enable_activation_checkpointing(model: nn.Module) -> None:
    inner = hf_model(model)
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise StrategyError(f"{type(inner).__name__} does not support activation checkpointing (transformers' "
                            "gradient checkpointing); drop --activation-checkpointing.")
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers 5's name
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(inner, "config"):
        inner.config.use_cache = False  # the cache is off in training anyway; say so, so transformers does not warn


def shard(model: nn.Module, device: torch.device, dtype: str) -> nn.Module:
    """FSDP2 over the default process group: one unit per repeated block, then the root. Each
    block's parameters move to ``device`` as it is sharded, so a worker never holds the whole
    model on the device."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ..core.sharded import repeated_blocks

    blocks = repeated_blocks(model)
    if not blocks:
        raise StrategyError(f"{type(hf_model(model)).__name__} has no repeated blocks (a ModuleList of layers of one "
                            "class) to shard with FSDP; use --train-strategy ddp.")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (MixedPrecisionPolicy(param_dtype=TORCH_DTYPES[dtype], reduce_dtype=torch.float32)
              if dtype != "float32" else MixedPrecisionPolicy())
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def prepare(model: nn.Module, *, strategy: str, device: torch.device, dtype: str, activation_checkpointing: bool,
            world: int) -> nn.Module:
    """The model a worker trains: dtypes set, checkpointing enabled, then sharded (fsdp) or
    wrapped in DDP (ddp; on one worker the model itself)."""
    set_dtypes(model, dtype)
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    if strategy == "fsdp":
        if world < 2:
            model.to(device)  # one worker: nothing to shard over
            return model
        return shard(model, device, dtype)
    model.to(device)
    if world < 2:
        return model
    kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
    return nn.parallel.DistributedDataParallel(model, **kwargs)


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this worker holds (its shards under FSDP)."""
    return int(sum(local_tensor(p).numel() * p.element_size() for p in model.parameters()))
