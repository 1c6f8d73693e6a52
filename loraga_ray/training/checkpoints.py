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


def unwrap_ddp(model):
    """The model inside DistributedDataParallel (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in unwrap_ddp(model).named_parameters() if p.requires_grad]


def save_checkpoint(folder: Path, model, optimizer, state: dict) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    save_file({n: p.detach().cpu().contiguous() for n, p in trainable_parameters(model)}, str(folder / TRAINABLE_FILE))
    osd = optimizer.state_dict()
    tensors, extra = {}, {}
    for idx, st in osd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                extra[f"{idx}.{k}"] = v
    save_file(tensors, str(folder / OPTIMIZER_FILE))
    state = dict(state, optimizer={"param_groups": osd["param_groups"], "extra": extra})
    (folder / STATE_FILE).write_text(json.dumps(state, indent=1))
    s = init_state(unwrap_ddp(model))
    if s is not None:
        s.save(folder / INIT_STATE_DIR)


def load_checkpoint(folder: Path, model, optimizer) -> dict:
    """Restore trainable weights and optimizer state; returns the JSON state (step, history...)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    weights = load_file(str(folder / TRAINABLE_FILE))
    params = trainable_parameters(model)
    names = [n for n, _ in params]
    if sorted(names) != sorted(weights):
        raise RuntimeError(
            f"the checkpoint in {folder} holds {len(weights)} trainable tensors that do not match this model's "
            f"{len(names)}; it belongs to a run with other options."
        )
    with torch.no_grad():
        for n, p in params:
            p.copy_(weights[n].to(p.device, p.dtype))
    state = json.loads((folder / STATE_FILE).read_text())
    tensors = load_file(str(folder / OPTIMIZER_FILE))
    opt_state: dict[int, dict] = {}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[k] = v
    for key, v in state["optimizer"]["extra"].items():
        idx, k = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[k] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer"]["param_groups"]})
    if (folder / INIT_STATE_DIR).is_dir() and init_state(unwrap_ddp(model)) is not None:
        set_init_state(unwrap_ddp(model), InitState.load(folder / INIT_STATE_DIR))
    return state


def write_deliverable(folder: Path, model, init: str, tokenizer) -> None:
    """The deliverable, inside the final checkpoint: adapter/ for the original base, or model/."""
    plain = unwrap_ddp(model)
    if init == "full":
        target = Path(folder) / EXPORT_DIR / "model"
        plain.save_pretrained(str(target), safe_serialization=True)
        tokenizer.save_pretrained(str(target))
    else:
        save_adapter(plain, Path(folder) / EXPORT_DIR / "adapter")
