"""Checkpoints of a training run (safetensors for tensors, JSON for the rest: no pickle) and the
run's deliverable: a PEFT adapter for the original base (``adapter/``) or full weights
(``model/``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.adapters import InitState, init_state, save_adapter, set_init_state

TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
INIT_STATE_DIR = "init_state"
EXPORT_DIR = "export"
LABELS_FILE = "labels.json"  # beside an exported adapter: the data's class names


def label_maps(names: list[str]) -> dict:
    """id2label / label2id, as Hugging Face configs hold them."""
    return {"id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)}}


def unwrap_ddp(model):
    """The model inside DistributedDataParallel (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in unwrap_ddp(model).named_parameters() if p.requires_grad]


def _shard_name(stem: str, rank: int, world: int) -> str:
    return f"{stem}-rank{rank:05d}-of-{world:05d}.safetensors"


def save_checkpoint(folder: Path, model, optimizer, state: dict, *, rank: int = 0, world: int = 1,
                    sharded: bool = False) -> None:
    """Write this worker's part of a checkpoint into ``folder``. Unsharded (DDP): rank 0 alone
    writes the whole trainable tensors. Sharded (FSDP2): every rank writes its own shards of the
    trainable tensors and of their optimizer state (``trainable-rankRRRRR-of-NNNNN.safetensors``),
    never gathering them; Ray Train merges the ranks' folders into one checkpoint. Rank 0 also
    writes ``state.json`` (step, history, the optimizer's hyperparameters) and the init state."""
    from safetensors.torch import save_file

    from .strategy import local_tensor

    folder = Path(folder)
    trainable = TRAINABLE_FILE if not sharded else _shard_name("trainable", rank, world)
    opt_file = OPTIMIZER_FILE if not sharded else _shard_name("optimizer", rank, world)
    meta = {"rank": str(rank), "world": str(world)}
    save_file({n: local_tensor(p.detach()).cpu().contiguous() for n, p in trainable_parameters(model)},
              str(folder / trainable), metadata=meta)
    osd = optimizer.state_dict()
    tensors, extra = {}, {}
    for idx, st in osd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = local_tensor(v.detach()).cpu().contiguous()
            else:
                extra[f"{idx}.{k}"] = v
    save_file(tensors, str(folder / opt_file), metadata=meta)
    if rank != 0:
        return
    state = dict(state, optimizer={"param_groups": osd["param_groups"], "extra": extra},
                 shards=world if sharded else None)
    (folder / STATE_FILE).write_text(json.dumps(state, indent=1))
    s = init_state(unwrap_ddp(model))
    if s is not None:
        s.save(folder / INIT_STATE_DIR)


def _read_whole(folder: Path, whole: str, stem: str, shards: int | None) -> dict[str, torch.Tensor]:
    """The whole tensors of a checkpoint: its one file, or its ranks' shards put back together
    along dim 0 (FSDP2 shards dim 0 in rank order; a 0-d tensor, such as AdamW's step, is the
    same on every rank)."""
    from safetensors.torch import load_file

    if not shards:
        return load_file(str(folder / whole))
    parts = []
    for r in range(shards):
        path = folder / _shard_name(stem, r, shards)
        if not path.is_file():
            raise RuntimeError(f"the checkpoint in {folder} is sharded over {shards} workers but {path.name} is missing: "
                               "it is incomplete (an upload that did not finish). Resume from an earlier checkpoint.")
        parts.append(load_file(str(path)))
    return {k: parts[0][k] if parts[0][k].dim() == 0 else torch.cat([p[k] for p in parts], dim=0) for k in parts[0]}


def _into(like: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``whole`` laid out as ``like``: this rank's shard of it when ``like`` is a DTensor."""
    if hasattr(like, "device_mesh") and whole.dim() > 0:
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(whole.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)
    return whole.to(like.device, like.dtype) if whole.is_floating_point() else whole


def load_checkpoint(folder: Path, model, optimizer) -> dict:
    """Restore trainable weights and optimizer state; returns the JSON state (step, history...).
    Either layout loads into either strategy: a sharded checkpoint is put back together and a
    whole one is cut into this rank's shards, so a run may resume under DDP or FSDP alike."""
    folder = Path(folder)
    state = json.loads((folder / STATE_FILE).read_text())
    shards = state.get("shards")
    weights = _read_whole(folder, TRAINABLE_FILE, "trainable", shards)
    params = trainable_parameters(model)
    names = [n for n, _ in params]
    if sorted(names) != sorted(weights):
        raise RuntimeError(
            f"the checkpoint in {folder} holds {len(weights)} trainable tensors that do not match this model's "
            f"{len(names)}; it belongs to a run with other options."
        )
    with torch.no_grad():
        for n, p in params:
            if tuple(weights[n].shape) != tuple(p.shape):
                raise RuntimeError(f"the checkpoint in {folder} holds {n} with shape {tuple(weights[n].shape)}, this "
                                   f"model's is {tuple(p.shape)}: it belongs to a run with other options.")
            p.copy_(_into(p, weights[n]))
    tensors = _read_whole(folder, OPTIMIZER_FILE, "optimizer", shards)
    by_index = [p for g in optimizer.param_groups for p in g["params"]]
    opt_state: dict[int, dict] = {}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[k] = _into(by_index[int(idx)], v) if v.dim() > 0 else v
    for key, v in state["optimizer"]["extra"].items():
        idx, k = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[k] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer"]["param_groups"]})
    if (folder / INIT_STATE_DIR).is_dir() and init_state(unwrap_ddp(model)) is not None:
        set_init_state(unwrap_ddp(model), InitState.load(folder / INIT_STATE_DIR))
    return state


def write_deliverable(folder: Path, model, init: str, tokenizer, *, rank: int = 0,
                      label_names: list[str] | None = None) -> None:
    """The deliverable, inside the final checkpoint: adapter/ for the original base, or model/.
    Every rank calls it (under FSDP the trainable tensors are gathered: only the adapter's and
    the new heads', never the base's); rank 0 writes. The data's class names are in model/'s
    config.json (id2label / label2id) or, beside an adapter, in labels.json (the same two maps,
    to pass to ``from_pretrained`` of the base)."""
    from .strategy import full_tensor

    plain = unwrap_ddp(model)
    if init == "full":
        sd = {k: full_tensor(v.detach()).cpu() for k, v in plain.state_dict().items()}  # every weight trained
        if rank == 0:
            target = Path(folder) / EXPORT_DIR / "model"
            plain.save_pretrained(str(target), state_dict=sd, safe_serialization=True)
            tokenizer.save_pretrained(str(target))
    else:
        target = save_adapter(plain, Path(folder) / EXPORT_DIR / "adapter", write=rank == 0)
        if rank == 0 and label_names:
            (target / LABELS_FILE).write_text(json.dumps(label_maps(label_names), indent=1))
