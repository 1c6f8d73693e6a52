"""The gradient estimate with the model sharded over a process group (FSDP2).

Every rank wraps each repeated transformer block, then the root, with ``fully_shard``: parameters
are split by rows (dim 0) across the ranks and gathered one block at a time for the forward and
the backward, and each backward reduce-scatters the gradients, so a rank ends a step holding its
own row block of every target gradient and nothing else. It adds that block into a float32 sum.

The estimate is the same token-weighted mean as :mod:`loraga_ray.core.gradients`: the gradient of
the summed loss over every supervised target of the sample, divided once by their total. FSDP
averages gradients over the ranks, so each step first all-reduces the step's target count T and
each rank calls backward on ``loss_sum_i · world / T``: the reduced gradient is then the step's
mean, and the sum adds it times T. FSDP's collectives need every rank to run the same number of
backward passes: a rank whose stream has ended (or whose batch holds no target) runs a zero-loss
pass on a one-token dummy batch while the others still have data.
"""

from __future__ import annotations

import time
from typing import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .gradients import GradientError, GradientSums, supervised_targets
from .targets import check_not_quantised, is_transposed


class ShardingError(ValueError):
    """The model cannot be sharded for the estimate (no repeated blocks to wrap, ...)."""


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the longest ModuleList of modules of one class."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best) and len({type(m) for m in module}) == 1:
            best = list(module)
    return best


def no_blocks_message(model_name: str) -> str:
    return (f"{model_name} has no repeated blocks (a ModuleList of layers of one class): the sharded strategy wraps "
            "one block per FSDP unit, so it cannot shard this model. Use --init-strategy replicated.")


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2's parameters and gradients), else ``t``."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective: every rank calls it), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class ShardedAccumulator:
    """Shards ``model`` over the default process group and accumulates each rank's row block of
    the float32 target-gradient sums. Only the target weights require gradients. The model is
    changed for good (its parameters become shards): build it for the estimate alone."""

    def __init__(self, model: nn.Module, target_names: Sequence[str], *, pad_id: int = 0, model_name: str = "the model"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        check_not_quantised(model)
        if not dist.is_initialized():
            raise RuntimeError("the sharded estimate needs torch.distributed initialised (one process per worker).")
        self.model, self.names, self.pad_id = model, list(target_names), pad_id
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        modules = dict(model.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise GradientError(f"target layers not found in the model: {missing[:5]}")
        blocks = repeated_blocks(model)
        if not blocks:
            raise ShardingError(no_blocks_message(model_name))
        for p in model.parameters():
            p.requires_grad_(False)
        for n in self.names:
            modules[n].weight.requires_grad_(True)
        self.transposed = {n: is_transposed(modules[n]) for n in self.names}
        self.device = next(model.parameters()).device
        if self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        mesh = init_device_mesh(self.device.type, (self.world,))
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.eval()
        self.weights = {n: modules[n].weight for n in self.names}  # now sharded DTensors
        self.sums = {n: torch.zeros(local_tensor(w).shape, dtype=torch.float32, device=self.device)
                     for n, w in self.weights.items()}
        self.num_examples = self.num_targets = self.num_batches = self.steps = 0
        self.seconds = 0.0

    def step(self, batch: Mapping[str, torch.Tensor] | None) -> bool:
        """One lockstep step with this rank's batch (None once its stream has ended). Returns
        False, on every rank at once, when no rank had a batch: the stream is done."""
        t0 = time.perf_counter()
        count = supervised_targets(batch, self.model) if batch is not None else 0
        flags = torch.tensor([0.0 if batch is None else 1.0, float(count)], dtype=torch.float64, device=self.device)
        dist.all_reduce(flags)
        if flags[0].item() == 0:
            return False
        total = float(flags[1].item())
        if batch is not None:
            self.num_examples += int(next(iter(batch.values())).shape[0])
            self.num_batches += 1
            self.num_targets += count
        if total > 0:  # every rank runs one backward (FSDP's collectives pair up across ranks)
            if count > 0:
                out = self.model(**batch)
                loss = out.loss.float() * (count * self.world / total)
            else:
                dummy = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device)
                out = self.model(input_ids=dummy, attention_mask=torch.ones_like(dummy))
                loss = out.logits.float().sum() * 0.0
            loss.backward()
            for n, w in self.weights.items():
                if w.grad is not None:  # (a layer no forward reaches adds nothing, as in the replicated path)
                    self.sums[n].add_(local_tensor(w.grad), alpha=total)
                w.grad = None
        self.steps += 1
        self.seconds += time.perf_counter() - t0
        return True

    def local_sums(self) -> GradientSums:
        """This rank's row blocks of the float32 sums, as stored (transposed for Conv1D layers:
        see ``self.transposed``), and this rank's own counts."""
        return GradientSums(dict(self.sums), self.num_examples, self.num_targets, self.num_batches, self.seconds)

    def held_bytes(self) -> dict:
        """Tensor bytes this rank holds: its parameter shards and its sums."""
        params = sum(local_tensor(p).numel() * p.element_size() for p in self.model.parameters())
        sums = sum(s.numel() * s.element_size() for s in self.sums.values())
        return {"param_bytes": int(params), "sum_bytes": int(sums)}
