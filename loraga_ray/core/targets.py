"""Which Linear layers get an adapter, and checks on the base model itself."""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

try:  # Hugging Face's transposed Linear (GPT-2 style); optional
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()  # type: ignore[assignment]

# Heads that are not adapted by default: they are trained in full (modules_to_save) or left alone.
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls", "embed_out")

# Class names of quantised Linear replacements (bitsandbytes, GPTQ, AWQ, HQQ, torchao, ...).
_QUANTISED_CLASS_HINTS = ("Linear4bit", "Linear8bitLt", "QuantLinear", "WQLinear", "HQQLinear", "QLinear")


class TargetError(ValueError):
    """The target module selection does not fit the model."""


class QuantisedModelError(TypeError):
    """LoRA-GA needs the full-precision gradient and weight of every target layer."""


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def is_transposed(module: nn.Module) -> bool:
    """True for HF Conv1D, whose weight is stored (d_in, d_out)."""
    return bool(Conv1D) and isinstance(module, Conv1D)


# Sequence-classification heads that a pretrained encoder or decoder does not have: new, randomly
# initialised, trained in full (PEFT's modules_to_save), and stored with the init artifact, since
# the gradient of every target layer went through them.
CLASSIFIER_HEADS = ("classifier", "score")


def classifier_heads(model: nn.Module) -> list[str]:
    """The top-level classification heads of a ``*ForSequenceClassification`` model (empty for
    any other model)."""
    if not type(model).__name__.endswith("ForSequenceClassification"):
        return []
    names = {n for n, _ in model.named_children()}
    return [h for h in CLASSIFIER_HEADS if h in names]


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a Linear-like module, whatever its storage layout."""
    w = module.weight
    return (w.shape[1], w.shape[0]) if is_transposed(module) else (w.shape[0], w.shape[1])


def _head_module_names(model: nn.Module) -> set[str]:
    heads = set()
    out_emb = None
    if hasattr(model, "get_output_embeddings"):
        try:
            out_emb = model.get_output_embeddings()
        except Exception:
            out_emb = None
    for name, module in model.named_modules():
        if out_emb is not None and module is out_emb:
            heads.add(name)
        if name.split(".")[-1] in HEAD_NAMES:
            heads.add(name)
    return heads


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def find_target_modules(model: nn.Module, target_modules: str | Iterable[str] | None = None) -> list[str]:
    """Names of the Linear layers to adapt, in module order.

    ``target_modules`` follows PEFT's conventions: a list of names or name suffixes
    (``["q_proj", "v_proj"]`` matches ``model.layers.0.self_attn.q_proj``), a single string
    taken as a regular expression that must match the whole name, or ``None``/``"all-linear"``
    for every Linear except the output head (``lm_head``, ``classifier``, ``score``, ...).
    """
    linears = [(n, m) for n, m in model.named_modules() if n and is_linear(m)]
    if target_modules is None or target_modules == "all-linear":
        heads = _head_module_names(model)
        names = [n for n, _ in linears if n not in heads and not any(n.startswith(h + ".") for h in heads)]
        what = "all-linear"
    elif isinstance(target_modules, str):
        rx = re.compile(target_modules)
        names = [n for n, _ in linears if rx.fullmatch(n)]
        what = repr(target_modules)
    else:
        patterns = list(target_modules)
        if not patterns:
            raise TargetError("target_modules is an empty list; pass layer names such as ['q_proj', 'v_proj'] or None for all Linears.")
        names = [n for n, _ in linears if _matches(n, patterns)]
        what = repr(patterns)
    if not names:
        examples = sorted({n.split(".")[-1] for n, _ in linears})[:20]
        raise TargetError(
            f"target_modules={what} matches no Linear layer of {type(model).__name__}. "
            f"Linear layer names in this model end with: {examples}. "
            "Pass some of these (suffix match) or a regular expression over full names."
        )
    return names


def check_not_quantised(model: nn.Module) -> None:
    """Raise if the model holds quantised weights: the gradient estimate and the base-weight
    update (W - eta*B0A0) both need full-precision weights."""
    qcfg = getattr(getattr(model, "config", None), "quantization_config", None)
    flagged = getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    if _dequantised_on_load(qcfg):
        qcfg, flagged = None, False  # GGUF checkpoints are dequantised to float by transformers when loaded;
        # the per-layer check below still catches any weight that is not floating point
    if qcfg or flagged:
        raise QuantisedModelError(
            f"{type(model).__name__} is quantised ({type(qcfg).__name__ if qcfg else 'quantised weights'}). LoRA-GA needs the "
            "full-precision weights: load the base in float32/bfloat16 for the init (and train a quantised copy "
            "afterwards if you must), or use plain LoRA for a quantised base."
        )
    for name, module in model.named_modules():
        cls = type(module).__name__
        w = getattr(module, "weight", None)
        quant_class = any(h in cls for h in _QUANTISED_CLASS_HINTS)
        int_weight = isinstance(w, torch.Tensor) and is_linear_like(module) and not w.dtype.is_floating_point
        if quant_class or int_weight:
            raise QuantisedModelError(
                f"layer {name!r} is quantised ({cls}, weight dtype {getattr(w, 'dtype', None)}). LoRA-GA needs the "
                "full-precision weights: load the base in float32/bfloat16 for the init, or use plain LoRA."
            )


def _dequantised_on_load(qcfg) -> bool:
    method = qcfg.get("quant_method") if isinstance(qcfg, dict) else getattr(qcfg, "quant_method", None)
    return str(getattr(method, "value", method)).lower() == "gguf"


def is_linear_like(module: nn.Module) -> bool:
    return is_linear(module) or any(h in type(module).__name__ for h in _QUANTISED_CLASS_HINTS)


def target_shapes(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of each named target layer."""
    modules = dict(model.named_modules())
    return {n: weight_shape(modules[n]) for n in names}


def check_rank_limit(shapes: Mapping[str, Sequence[int]], rank: int, *, directions: int = 2,
                     label: str | None = None, fix: str | None = None) -> int:
    """The one rank check: every target layer must take ``directions * rank`` directions
    (LoRA-GA uses 2r gradient directions, so 2r <= min(d_out, d_in); plain LoRA and PiSSA need
    r <= min(d_out, d_in)). Returns the largest rank that fits; raises :class:`TargetError`
    naming the smallest layer and the limit. ``label`` says where the rank came from (a flag,
    a search-space key); ``fix`` replaces the default advice."""
    limit = min(min(int(d) for d in s) for s in shapes.values()) // directions
    if rank <= limit:
        return limit
    name = min(shapes, key=lambda n: min(shapes[n]))
    d_out, d_in = (int(d) for d in shapes[name])
    too_small = sum(directions * rank > min(s) for s in shapes.values())
    if directions == 2:
        why, bound = f"LoRA-GA uses 2r = {2 * rank} gradient directions per layer", "min(d_out, d_in)/2"
    else:
        why, bound = f"a rank-r adapter needs r = {rank} <= min(d_out, d_in)", "min(d_out, d_in)"
    raise TargetError(
        f"{label or f'rank={rank}'} is too large: {why}, but layer {name!r} is {d_out}x{d_in} "
        f"({too_small} of {len(shapes)} target layer(s) too small), so r <= {bound} = {limit}. "
        + (fix or "Lower the rank, or leave the small layers out of the target modules.")
    )
