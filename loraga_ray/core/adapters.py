"""From an init artifact to a LoRA-GA initialised PEFT model, and back to a plain PEFT adapter.

``apply_lora_ga`` sets A0, B0 from the artifact and stores W0 - eta*B0A0 as the base weight, so
the model's output is unchanged. The trained model's effective weight is then
W0 + eta*(BA - B0A0). ``save_adapter`` writes exactly that change as a rank-2r LoRA adapter
(A' = [A; A0], B' = [B, -B0], alpha' = 2*alpha, or sqrt(2)*alpha with rsLoRA), which
``PeftModel.from_pretrained`` loads onto the *unmodified* base model.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .artifact import ArtifactError, InitArtifact
from .factors import DIRECTIONS, LORA_ONE_GAMMA, SCALES, lora_ga_factors, lora_one_factors
from .files import atomic_folder
from .targets import check_not_quantised, check_rank_limit, is_transposed

INIT_STATE_FILE = "loraga_init.safetensors"
INIT_META_FILE = "loraga_init.json"


@dataclass
class InitState:
    """What save_adapter needs to express the trained model relative to the original base."""

    rank: int
    alpha: float
    eta: float
    use_rslora: bool
    direction: str
    scale: str
    gamma: float
    fingerprint: str | None
    A0: dict[str, torch.Tensor] = field(default_factory=dict)  # r x d_in
    B0: dict[str, torch.Tensor] = field(default_factory=dict)  # d_out x r

    def save(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"{n}.A0": a.contiguous() for n, a in self.A0.items()}
        tensors.update({f"{n}.B0": b.contiguous() for n, b in self.B0.items()})
        save_file(tensors, str(folder / INIT_STATE_FILE))
        meta = {k: v for k, v in asdict(self).items() if k not in ("A0", "B0")}
        meta["modules"] = list(self.A0)
        (folder / INIT_META_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "InitState":
        folder = Path(folder)
        meta = json.loads((folder / INIT_META_FILE).read_text())
        tensors = load_file(str(folder / INIT_STATE_FILE))
        modules = meta.pop("modules")
        return cls(**meta, A0={n: tensors[f"{n}.A0"] for n in modules}, B0={n: tensors[f"{n}.B0"] for n in modules})


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "peft_config"):
        model = model.module  # DistributedDataParallel and friends
    return model


def infer_task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    if name.endswith("ForConditionalGeneration") or name.endswith("ForSeq2SeqLM"):
        return "SEQ_2_SEQ_LM"
    return None


def exact_names_regex(names: Sequence[str]) -> str:
    """A PEFT target_modules regex that matches exactly these module names."""
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def init_state(model: nn.Module, adapter_name: str = "default") -> InitState | None:
    """The LoRA-GA init recorded on a model by apply_lora_ga (None for other adapters)."""
    return getattr(_unwrap(model), "_loraga_init", {}).get(adapter_name)


def set_init_state(model: nn.Module, state: InitState, adapter_name: str = "default") -> None:
    m = _unwrap(model)
    if "_loraga_init" not in m.__dict__:
        m.__dict__["_loraga_init"] = {}
    m.__dict__["_loraga_init"][adapter_name] = state


def _check_args(artifact: InitArtifact, rank: int, alpha: float, direction: str, scale: str, gamma: float,
                directions: int = 2) -> None:
    """``directions``: singular directions per rank (LoRA-GA 2, LoRA-One 1)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r} is not one of {DIRECTIONS}.")
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} is not one of {SCALES}.")
    if not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}.")
    for name, value in (("alpha", alpha), ("gamma", gamma)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive finite number, got {value!r}.")
    allowed = artifact.k // directions
    if rank > allowed:
        method = "LoRA-GA" if directions == 2 else "LoRA-One"
        raise ArtifactError(
            f"rank={rank} is larger than this artifact allows for {method}: it holds k={artifact.k} singular vectors "
            f"per layer, enough for rank <= {allowed}. Use rank <= {allowed}, or re-estimate with max_rank >= "
            f"{rank if directions == 2 else -(-rank // 2)} (the gradient estimate is the expensive part; one artifact "
            "serves all smaller ranks)."
        )
    check_rank_limit(artifact.meta["shapes"], rank, label=f"rank={rank}", directions=directions)


def apply_lora_ga(
    model: nn.Module,
    artifact: InitArtifact,
    *,
    rank: int,
    alpha: float,
    direction: str = "ArB2r",
    scale: str = "stable",
    gamma: float = 16.0,
    use_rslora: bool = True,
    adapter_name: str = "default",
    lora_dropout: float = 0.0,
    modules_to_save: Sequence[str] | None = None,
    task_type: str | None = None,
    seed: int = 0,
):
    """Wrap ``model`` in a PEFT LoRA model initialised by LoRA-GA from ``artifact``.

    Everything is checked before the model is touched (quantised base, rank, direction, scale,
    fingerprint of the target weights); on any error the model is left unchanged. On success the
    model's own target weights become W0 - eta*B0A0 (computed in float32, cast back) and the
    returned ``peft.PeftModel`` computes the same outputs as the original model with the
    artifact's classifier head: an artifact estimated on a sequence classifier carries the head
    its gradient went through, and that head replaces the model's own (drawn from whatever seed
    loaded it), so the init and its head always belong together.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel) or hasattr(model, "peft_config"):
        raise ValueError(
            "apply_lora_ga takes the plain base model, not a PeftModel: load the original base "
            "(e.g. AutoModel...from_pretrained) and apply the artifact to it."
        )
    check_not_quantised(model)
    _check_args(artifact, rank, alpha, direction, scale, gamma)
    artifact.check_model(model)

    modules = dict(model.named_modules())
    names = artifact.target_modules
    state = InitState(rank, float(alpha), 0.0, use_rslora, direction, scale, float(gamma), artifact.meta.get("fingerprint"))
    deltas = {}
    for name in names:
        m = modules[name]
        U, _, V = artifact.factors[name]
        w = m.weight.detach()
        w_oriented = w.t() if is_transposed(m) else w
        f = lora_ga_factors(
            U.to(w.device), V.to(w.device), rank=rank, alpha=alpha, direction=direction, scale=scale,
            gamma=gamma, use_rslora=use_rslora, weight=w_oriented if scale == "weight_svd" else None, seed=seed,
        )
        state.eta = f.eta
        state.A0[name], state.B0[name] = f.A.cpu(), f.B.cpu()
        deltas[name] = (f.A, f.B)

    peft_model = _peft_with_factors(
        model, artifact, deltas, state.eta, rank=rank, alpha=alpha, use_rslora=use_rslora, adapter_name=adapter_name,
        lora_dropout=lora_dropout, modules_to_save=modules_to_save, task_type=task_type, keep_output=True)
    set_init_state(peft_model, state, adapter_name)
    return peft_model


def apply_lora_one(
    model: nn.Module,
    artifact: InitArtifact,
    *,
    rank: int,
    alpha: float,
    gamma: float = LORA_ONE_GAMMA,
    use_rslora: bool = True,
    adapter_name: str = "default",
    lora_dropout: float = 0.0,
    modules_to_save: Sequence[str] | None = None,
    task_type: str | None = None,
):
    """Wrap ``model`` in a PEFT LoRA model initialised by LoRA-One from the same artifact
    LoRA-GA uses (its top-r singular triplets of G; any rank up to the artifact's ``max_rank``).

    A0 = diag(sqrt(S_r)) V_r^T / sqrt(gamma*S_1), B0 = -U_r diag(sqrt(S_r)) / sqrt(gamma*S_1)
    (:func:`~loraga_ray.core.factors.lora_one_factors`). The base weights are kept, so the model
    starts one step away from the original: W0 + eta*B0A0 = W0 - eta/(gamma*S_1) * G_r, with G_r
    the best rank-r approximation of the gradient. Its output therefore differs from the base's
    (that is the method), its trained adapter is a plain rank-r PEFT adapter for the unmodified
    base, and the classifier head is the artifact's, as for :func:`apply_lora_ga`. Everything is
    checked before the model is touched."""
    from peft import PeftModel

    if isinstance(model, PeftModel) or hasattr(model, "peft_config"):
        raise ValueError("apply_lora_one takes the plain base model, not a PeftModel: load the original base and apply "
                         "the artifact to it.")
    check_not_quantised(model)
    _check_args(artifact, rank, alpha, "ArB2r", "stable", gamma, directions=1)
    artifact.check_model(model)
    deltas, eta = {}, 0.0
    for name in artifact.target_modules:
        U, S, V = artifact.factors[name]
        try:
            f = lora_one_factors(U, S, V, rank=rank, alpha=alpha, gamma=gamma, use_rslora=use_rslora)
        except ValueError as e:
            raise ArtifactError(f"{name}: {e}") from None
        eta = f.eta
        deltas[name] = (f.A, f.B)
    return _peft_with_factors(
        model, artifact, deltas, eta, rank=rank, alpha=alpha, use_rslora=use_rslora, adapter_name=adapter_name,
        lora_dropout=lora_dropout, modules_to_save=modules_to_save, task_type=task_type, keep_output=False)


def _peft_with_factors(model, artifact: InitArtifact, deltas: dict, eta: float, *, rank: int, alpha: float,
                       use_rslora: bool, adapter_name: str, lora_dropout: float, modules_to_save, task_type,
                       keep_output: bool):
    """get_peft_model over the artifact's targets (with the artifact's head), then lora_A/lora_B
    set to ``deltas`` (name -> (A0, B0)); with ``keep_output`` the base weight becomes W0 - eta*B0A0."""
    from peft import LoraConfig, get_peft_model

    modules = dict(model.named_modules())
    names = artifact.target_modules
    artifact.load_head(model)  # before PEFT copies it into modules_to_save
    all_conv1d = all(is_transposed(modules[n]) for n in names)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=exact_names_regex(names),
        use_rslora=use_rslora,
        lora_dropout=lora_dropout,
        init_lora_weights=True,
        fan_in_fan_out=all_conv1d,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        task_type=task_type or infer_task_type(model),
    )
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    inner = peft_model.base_model.model
    with torch.no_grad():
        for name in names:
            layer = inner.get_submodule(name)
            A, B = deltas[name]
            scaling = layer.scaling[adapter_name]
            if not math.isclose(scaling, eta, rel_tol=1e-6):
                raise RuntimeError(f"PEFT's scaling {scaling} for {name} differs from eta={eta}")
            lora_A, lora_B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            lora_A.copy_(A.to(device=lora_A.device, dtype=lora_A.dtype))
            lora_B.copy_(B.to(device=lora_B.device, dtype=lora_B.dtype))
            if keep_output:
                base = layer.get_base_layer().weight
                delta = eta * (B.to(base.device) @ A.to(base.device))
                if is_transposed(layer.get_base_layer()):
                    delta = delta.t()
                base.copy_((base.float() - delta).to(base.dtype))
    return peft_model


def adapter_for_original_base(model: nn.Module, adapter_name: str = "default"):
    """(state dict, LoraConfig) of a plain LoRA adapter for the original, unmodified base.

    For a LoRA-GA model the change eta*(BA - B0A0) is written at rank 2r; any other PEFT
    LoRA model is returned as it is."""
    from peft import get_peft_model_state_dict

    model = _unwrap(model)
    if not hasattr(model, "peft_config"):
        raise ValueError("save_adapter needs a PEFT model (from apply_lora_ga or get_peft_model).")
    config = copy.deepcopy(model.peft_config[adapter_name])
    from .sharded import full_tensor

    # under FSDP the values are DTensor shards: every rank gathers the adapter's (never the base's)
    sd = {k: full_tensor(v.detach()).cpu().contiguous()
          for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}
    state = init_state(model, adapter_name)
    if state is None:
        return sd, config
    for name in state.A0:
        ka = f"base_model.model.{name}.lora_A.weight"
        kb = f"base_model.model.{name}.lora_B.weight"
        if ka not in sd or kb not in sd:
            raise KeyError(f"adapter weights of {name!r} not found in the PEFT state dict")
        A, B = sd[ka], sd[kb]
        A0, B0 = state.A0[name].to(A.dtype), state.B0[name].to(B.dtype)
        sd[ka] = torch.cat([A, A0], dim=0).contiguous()
        sd[kb] = torch.cat([B, -B0], dim=1).contiguous()
    config.r = 2 * state.rank
    config.lora_alpha = state.alpha * (math.sqrt(2) if state.use_rslora else 2.0)
    config.use_rslora = state.use_rslora
    config.init_lora_weights = True
    config.rank_pattern, config.alpha_pattern = {}, {}
    return sd, config


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, *, adapter_name: str = "default",
                 overwrite: bool = False, write: bool = True) -> Path:
    """Write a standard PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) that
    ``PeftModel.from_pretrained(original_base, out_dir)`` loads to reproduce ``model``'s outputs.

    The folder is written atomically (temporary sibling, then put in place). An adapter this
    tool wrote before is replaced only with ``overwrite=True``; any other existing folder with
    files in it is refused and left as it is. A model sharded with FSDP2: every rank calls this
    (gathering the adapter's tensors is a collective) and one writes; ``write=False`` on the others."""
    out_dir = Path(out_dir)
    sd, config = adapter_for_original_base(model, adapter_name)
    if not write:
        return out_dir
    with atomic_folder(out_dir, kind="adapter", overwrite=overwrite) as tmp:
        config.save_pretrained(str(tmp))
        save_file(sd, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        state = init_state(model, adapter_name)
        if state is not None:
            info = {k: v for k, v in asdict(state).items() if k not in ("A0", "B0")}
            info["note"] = "LoRA-GA adapter rewritten for the original base: rank 2r = [trained; initial] factors."
            (tmp / "loraga.json").write_text(json.dumps(info, indent=2))
    return out_dir


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold the adapter into the weights and return the plain model with the trained weights
    W0 + eta*(BA - B0A0) (PEFT's merge_and_unload; the base already holds W0 - eta*B0A0)."""
    return _unwrap(model).merge_and_unload()


def save_merged(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, *, overwrite: bool = False) -> Path:
    """Merge (in place) and save full weights with ``save_pretrained`` (safetensors). The
    destination is checked first, as for :func:`save_adapter`, before the model is merged."""
    from .files import check_destination

    out_dir = Path(out_dir)
    check_destination(out_dir, "merged model", overwrite)
    merged = merge_adapter(model)
    with atomic_folder(out_dir, kind="merged model", overwrite=overwrite) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir
