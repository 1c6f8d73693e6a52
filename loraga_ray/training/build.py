"""The model a training worker starts from, for each ``--init``: LoRA-GA from the init artifact
(ours), PEFT's default LoRA, PEFT's PiSSA, PEFT's built-in LoRA-GA (a baseline), or full
fine-tuning. Every LoRA variant uses the same rsLoRA setting and trains new sequence-classification
heads in full (``modules_to_save``)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..core.adapters import (InitState, apply_lora_ga, apply_lora_one, exact_names_regex, infer_task_type,
                             set_init_state)
from ..core.artifact import InitArtifact
from ..core.targets import find_target_modules, is_transposed
from ..options import ARTIFACT_INITS, TrainOptions, load_kwargs

log = logging.getLogger(__name__)

PISSA_INIT = "pissa_niter_4"  # PEFT's fast PiSSA (randomized SVD with 4 power iterations)


def artifact_payload(art: InitArtifact) -> dict:
    """The artifact as numpy arrays + meta, to put in the object store (zero-copy for workers)."""
    return {"meta": art.meta, "factors": {n: tuple(t.numpy() for t in f) for n, f in art.factors.items()},
            "head": {n: t.numpy() for n, t in (art.head or {}).items()}}


def artifact_from_payload(payload: dict) -> InitArtifact:
    factors = {n: tuple(torch.tensor(np.array(a)) for a in f) for n, f in payload["factors"].items()}
    head = {n: torch.tensor(np.array(a)) for n, a in (payload.get("head") or {}).items()} or None
    return InitArtifact(factors=factors, meta=payload["meta"], head=head)


def build_model(opts: TrainOptions, spec, task: str, num_labels: int, artifact: InitArtifact | None = None,
                dtype: str = "float32", label_names: list[str] | None = None, device=None,
                restarting: bool = False, report=None, estimate_sample=None):
    """The base model (seeded head) with the chosen init applied, on CPU.

    The base is loaded in ``dtype`` (LoRA-GA's W0 - eta*B0A0 is computed per layer in float32
    and cast once); full fine-tuning loads float32, since every weight trains. Trainable
    parameters are made float32 later (``strategy.set_dtypes``).

    lora-ga: apply_lora_ga from the artifact; lora-one: apply_lora_one from the same artifact (the
    base kept: the model starts one rank-r gradient step away); lora: PEFT's default init; pissa: PEFT's PiSSA
    (the initial factors are recorded so save_adapter writes an adapter for the original base);
    full: every parameter trainable. All LoRA variants use the same rsLoRA setting, no dropout by
    default, and train sequence-classification heads in full (modules_to_save).

    ``--head-warmup-steps``: the artifact inits take the head the init pipeline fitted; every
    other init fits its head here, before its own init, in the same way on the same sample (on
    ``device`` when given, e.g. the worker's GPU), so every method starts from the same head. A
    worker ``restarting`` from a checkpoint skips it (the checkpoint holds the trained head),
    except for peft-lora-ga, whose init itself goes through the head. ``report(msg)`` is told
    the warm-up's losses. ``estimate_sample``: the estimate's sample as the driver drew it (None:
    drawn here from ``opts.data``)."""
    from peft import LoraConfig, get_peft_model

    from ..models import load_model, new_head_modules

    from .strategy import TORCH_DTYPES

    load_dtype = torch.float32 if opts.init == "full" else TORCH_DTYPES[dtype]
    model = load_model(spec, task=task, num_labels=num_labels, seed=opts.seed, dtype=load_dtype)
    set_label_names(model, label_names)
    heads = new_head_modules(model, task)
    warm = opts.head_warmup_steps and opts.init not in ARTIFACT_INITS and (not restarting or opts.init == "peft-lora-ga")
    # the estimate's sample, tokenised once for both its users here
    batches = estimate_batches(opts, spec, task, estimate_sample) if warm or opts.init == "peft-lora-ga" else None
    if warm:
        stats = warm_up_run_head(opts, model, heads, batches, device)
        if report is not None:
            report(f"head warm-up: {stats['steps']} steps of {stats['batch_size']} at lr {stats['lr']:g}, loss "
                   f"{stats['loss_first']:.4f} -> {stats['loss_last']:.4f}")
    if opts.init == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if opts.init in ARTIFACT_INITS:
        if artifact is None:
            raise ValueError(f"init {opts.init} needs an init artifact.")
        note_head_seed(opts, artifact)
        if opts.init == "lora-one":
            return apply_lora_one(
                model, artifact, rank=opts.rank, alpha=opts.alpha, gamma=opts.stable_gamma,
                use_rslora=opts.use_rslora, lora_dropout=opts.lora_dropout, modules_to_save=heads or None,
            )
        return apply_lora_ga(
            model, artifact, rank=opts.rank, alpha=opts.alpha, direction=opts.direction, scale=opts.scale,
            gamma=opts.stable_gamma, use_rslora=opts.use_rslora, lora_dropout=opts.lora_dropout,
            modules_to_save=heads or None, seed=opts.seed,
        )
    names = find_target_modules(model, opts.target_modules)
    modules = dict(model.named_modules())
    extra = {}
    if opts.init == "peft-lora-ga":
        from peft.tuners.lora import LoraGAConfig

        peft_scale = {"gd": "gd_scale"}.get(opts.scale, opts.scale)
        extra = dict(lora_ga_config=LoraGAConfig(direction=opts.direction, scale=peft_scale, stable_gamma=int(opts.stable_gamma)))
    config = LoraConfig(
        r=opts.rank,
        lora_alpha=opts.alpha,
        target_modules=exact_names_regex(names),
        use_rslora=opts.use_rslora,
        lora_dropout=opts.lora_dropout,
        init_lora_weights={"lora": True, "pissa": PISSA_INIT, "peft-lora-ga": "lora_ga"}[opts.init],
        fan_in_fan_out=all(is_transposed(modules[n]) for n in names),
        modules_to_save=heads or None,
        task_type=infer_task_type(model),
        **extra,
    )
    if opts.init == "peft-lora-ga":
        _peft_loraga_preprocess(model, config, batches)
    torch.manual_seed(opts.seed)
    peft_model = get_peft_model(model, config)
    if opts.init in ("pissa", "peft-lora-ga"):
        inner = peft_model.base_model.model
        state = InitState(opts.rank, float(opts.alpha), 0.0, opts.use_rslora, opts.init, opts.init, 0.0, None)
        for name in names:
            layer = inner.get_submodule(name)
            state.eta = float(layer.scaling["default"])
            state.A0[name] = layer.lora_A["default"].weight.detach().float().cpu().clone()
            state.B0[name] = layer.lora_B["default"].weight.detach().float().cpu().clone()
        set_init_state(peft_model, state)
    return peft_model


def set_label_names(model, names: list[str] | None) -> None:
    """The data's class names as the model config's id2label / label2id (saved with the model)."""
    if names:
        model.config.id2label = {i: n for i, n in enumerate(names)}
        model.config.label2id = {n: i for i, n in enumerate(names)}


def note_head_seed(opts: TrainOptions, artifact: InitArtifact) -> None:
    """Say so when the run's seed would have drawn another head than the artifact's."""
    seed = (artifact.meta.get("head") or {}).get("seed")
    if artifact.head and seed is not None and seed != opts.seed:
        log.info("--seed %d: the classifier head is the artifact's (drawn with seed %d, the one its gradient went "
                 "through), not a new one; the seed still sets the data order", opts.seed, seed)


def estimate_batches(opts: TrainOptions, spec, task: str, table=None) -> list[dict]:
    """The sample our init pipeline draws (init_samples rows of the train split, seed; ``table``
    when the driver drew it), in its order, collated in batches of init_batch_size."""
    from ..data import Encoder, iter_batches, load_split, sample_table
    from ..models import load_tokenizer

    if table is None:
        table = sample_table(load_split(opts.data, "train", **load_kwargs(opts)), opts.init_samples, opts.seed)
    tok = load_tokenizer(spec)
    return list(iter_batches(table, Encoder(tok, task, max_length=opts.max_length), opts.init_batch_size, tok.pad_token_id, task))


def warm_up_run_head(opts: TrainOptions, model, heads: list[str], batches: list[dict], device=None) -> dict:
    """--head-warmup-steps for an init without an artifact: the init pipeline's warm-up
    (core.head.warm_up_head) on the same sample's ``batches`` (:func:`estimate_batches`), from
    the same head."""
    from ..core.head import warm_up_head

    moved = device is not None and torch.device(device) != next(model.parameters()).device
    home = next(model.parameters()).device
    if moved:
        model.to(device)
    try:
        stats = warm_up_head(model, batches, heads, steps=opts.head_warmup_steps,
                             lr=opts.head_warmup_lr, device=device, batch_size=opts.init_batch_size)
    finally:
        if moved:
            model.to(home)
    log.info("head warm-up: %d steps at lr %g, loss %.4f -> %.4f", stats["steps"], stats["lr"], stats["loss_first"],
             stats["loss_last"])
    return stats


def _peft_loraga_preprocess(model, config, batches: list[dict]) -> None:
    """PEFT's built-in LoRA-GA (a baseline): its gradient estimate on the same sample our init
    pipeline draws (:func:`estimate_batches`: init_samples rows of the train split, seed, in
    batches of init_batch_size)."""
    from peft.tuners.lora import preprocess_loraga

    device = next(model.parameters()).device

    def train_step():
        for b in batches:
            model(**{k: v.to(device) for k, v in b.items()}).loss.backward()

    preprocess_loraga(model, config, train_step)
