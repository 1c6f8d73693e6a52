"""Training models larger than one GPU: FSDP2 against DDP, sharded checkpoints and resume, the
export gathered from shards, a bfloat16 base, activation checkpointing, and the planner's
training rows (with the refusal of a run that fits nowhere, before any worker starts).

Runs on CPU: FSDP2 and DDP over gloo in Ray Train workers, the tiny models of test_train."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from loraga_ray.jobs.train import fit
from loraga_ray.training.build import build_model
import test_train
from test_train import _eval_loss, _opts

assets, store, quick_controller = test_train.assets, test_train.store, test_train.quick_controller  # its fixtures

STEPS = 3


def _run(assets, tmp_path, name, **kw):
    opts = _opts(assets, tmp_path / name, max_steps=STEPS, eval_every=STEPS, **kw)
    return opts, fit(opts)


def _losses(metrics) -> list[float]:
    return [h["train_loss"] for h in metrics["history"]]


@pytest.fixture(scope="module")
def artifacts(assets, tmp_path_factory):
    """One init artifact per model, estimated in-process, so the DDP and FSDP runs start from the
    same init."""
    from loraga_ray.core.estimate import estimate_init
    from loraga_ray.data import Encoder, iter_batches, load_split
    from loraga_ray.models import load_model, load_tokenizer

    root = tmp_path_factory.mktemp("strategy_artifacts")
    out = {}
    for key, model, data, task in (("cls", "bert", "cls", "seq-cls"), ("causal", "llama", "arith", "causal-lm")):
        m = load_model(str(assets / model), task=task, num_labels=2, seed=0)
        tok = load_tokenizer(str(assets / model))
        table = load_split(str(assets / data), "train").slice(0, 32)
        art = estimate_init(m, iter_batches(table, Encoder(tok, task, 128), 8, tok.pad_token_id, task), max_rank=2,
                            base_model=str(assets / model))
        out[key] = str(art.save(root / key))
    return out


def _kw(assets, artifacts, which):
    if which == "cls":
        return dict(artifact=artifacts["cls"])
    return dict(model=str(assets / "llama"), data=str(assets / "arith"), artifact=artifacts["causal"])


@pytest.fixture(scope="module")
def runs(ray_session, assets, artifacts, store, tmp_path_factory):
    """2-worker DDP and FSDP runs of the classifier (trained head) and the causal LM, float32."""
    tmp = tmp_path_factory.mktemp("strategies")
    out = {}
    for which in ("cls", "causal"):
        for strategy in ("ddp", "fsdp"):
            out[which, strategy] = _run(assets, tmp, f"{which}-{strategy}", train_strategy=strategy, tracking_uri=store,
                                        **_kw(assets, artifacts, which))
    return out


@pytest.mark.parametrize("which", ["cls", "causal"])
def test_fsdp_matches_ddp_over_the_first_steps(runs, which):
    (_, ddp), (_, fsdp) = runs[which, "ddp"], runs[which, "fsdp"]
    assert ddp["done"] and fsdp["done"] and len(_losses(fsdp)) == STEPS
    assert _losses(fsdp) == pytest.approx(_losses(ddp), rel=1e-4)
    assert [h["grad_norm"] for h in fsdp["history"]] == pytest.approx([h["grad_norm"] for h in ddp["history"]], rel=1e-4)
    assert fsdp["eval_loss"] == pytest.approx(ddp["eval_loss"], rel=1e-4)


@pytest.mark.parametrize("which", ["cls", "causal"])
def test_fsdp_checkpoint_is_sharded_and_its_export_loads_onto_the_original_base(runs, assets, which):
    """Each rank wrote its own shards (no whole copy, no pickle); the adapter, gathered from the
    shards (its factors and the trained head only), loads with PeftModel.from_pretrained onto a
    freshly loaded base and reproduces the run's eval loss in one process."""
    from peft import PeftModel

    from loraga_ray.models import load_model

    opts, metrics = runs[which, "fsdp"]
    out = Path(opts.out)
    ckpt = sorted(p for p in (out / "ray" / "train").glob("checkpoint_*") if p.is_dir())[-1]
    names = sorted(p.name for p in ckpt.iterdir())
    assert "trainable-rank00000-of-00002.safetensors" in names and "trainable-rank00001-of-00002.safetensors" in names
    assert "optimizer-rank00001-of-00002.safetensors" in names and "trainable.safetensors" not in names
    assert json.loads((ckpt / "state.json").read_text())["shards"] == 2
    assert not [p for p in ckpt.rglob("*") if p.suffix in (".pt", ".pkl", ".bin")]
    task = "seq-cls" if which == "cls" else "causal-lm"
    base = load_model(opts.model, task=task, num_labels=2, seed=opts.seed)
    model = PeftModel.from_pretrained(base, str(out / "adapter"))
    loss, acc = _eval_loss(model, assets, "cls" if which == "cls" else "arith", task)
    assert loss == pytest.approx(metrics["eval_loss"], rel=1e-5, abs=1e-6)
    if which == "cls":
        assert acc == pytest.approx(metrics["eval_accuracy"])
        from safetensors.torch import load_file

        keys = load_file(str(out / "adapter" / "adapter_model.safetensors")).keys()
        assert any("classifier" in k for k in keys)  # the trained head travels in the adapter
        assert all("lora_" in k or "classifier" in k for k in keys)  # and nothing of the base


def test_fsdp_resume_gives_the_uninterrupted_adapter(runs, assets, artifacts, store, tmp_path):
    """Stopped after 1 step (a sharded checkpoint), resumed under FSDP: the uninterrupted FSDP
    run's adapter (max abs diff <= 1e-6)."""
    from safetensors.torch import load_file

    opts, metrics = runs["cls", "fsdp"]
    again = dataclasses.replace(opts, out=str(tmp_path / "resumed"), run_name="resumed")
    first = fit(dataclasses.replace(again, stop_after=1))
    assert not first["done"] and first["step"] == 1
    second = fit(dataclasses.replace(again, resume=True))
    assert second["done"]
    a = load_file(str(Path(opts.out) / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert _losses(second) == pytest.approx(_losses(metrics), rel=1e-5)


def _layout_worker(rank: int, world: int, port: int, folder: str, queue) -> None:
    """One FSDP rank: the tiny LLaMA with LoRA, sharded, two AdamW steps, a sharded checkpoint;
    then a fresh sharded model loads the whole-tensor checkpoint the parent wrote."""
    import torch.distributed as dist

    from loraga_ray.training.checkpoints import load_checkpoint, save_checkpoint
    from loraga_ray.training.strategy import full_tensor, prepare

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, opt = _layout_model(prepare_kw=dict(strategy="fsdp", world=world), prepare=prepare)
        _two_steps(model, opt, rank)
        save_checkpoint(Path(folder) / "sharded", model, opt, {"step": 2, "history": []}, rank=rank, world=world,
                        sharded=True)
        whole = {n: full_tensor(p.detach()).numpy().copy() for n, p in model.named_parameters() if p.requires_grad}
        if rank == 0:
            queue.put(whole)
        dist.barrier()
        fresh, opt2 = _layout_model(prepare_kw=dict(strategy="fsdp", world=world), prepare=prepare)
        load_checkpoint(Path(folder) / "whole", fresh, opt2)  # written by the parent, unsharded
        loaded = {n: full_tensor(p.detach()).numpy().copy() for n, p in fresh.named_parameters() if p.requires_grad}
        moments = {i: full_tensor(opt2.state[p]["exp_avg"]).numpy().copy()
                   for i, p in enumerate(opt2.param_groups[0]["params"])}
        if rank == 0:
            queue.put((loaded, moments))
    finally:
        dist.destroy_process_group()


def _layout_model(prepare_kw, prepare):
    from peft import LoraConfig, get_peft_model

    from tiny import tiny_llama

    model = get_peft_model(tiny_llama(0), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    model = prepare(model, device=torch.device("cpu"), dtype="float32", activation_checkpointing=False, **prepare_kw)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def _two_steps(model, opt, rank):
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        ids = torch.randint(3, 64, (2, 8), generator=g)
        model.train()
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def test_checkpoint_layouts_load_into_either_strategy(tmp_path):
    """A sharded checkpoint (2 FSDP ranks, each its own files) loads into an unsharded model as
    the gathered tensors; a whole-tensor checkpoint loads into FSDP ranks as their shards, with
    the AdamW moments: so a run resumes under DDP or FSDP whichever layout its checkpoint has."""
    import socket

    import torch.multiprocessing as mp

    from loraga_ray.training.checkpoints import load_checkpoint, save_checkpoint
    from loraga_ray.training.strategy import prepare

    (tmp_path / "sharded").mkdir()
    (tmp_path / "whole").mkdir()
    # the whole-tensor checkpoint the FSDP ranks load: an unsharded model after two steps
    ref, ref_opt = _layout_model(prepare_kw=dict(strategy="ddp", world=1), prepare=prepare)
    _two_steps(ref, ref_opt, 7)
    save_checkpoint(tmp_path / "whole", ref, ref_opt, {"step": 2, "history": []})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_layout_worker, args=(r, 2, port, str(tmp_path), queue)) for r in range(2)]
    for p in procs:
        p.start()
    gathered = queue.get(timeout=300)
    loaded, moments = queue.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "trainable-rank00001-of-00002.safetensors" in files and "trainable.safetensors" not in files
    # sharded -> one process
    model, opt = _layout_model(prepare_kw=dict(strategy="ddp", world=1), prepare=prepare)
    assert load_checkpoint(tmp_path / "sharded", model, opt)["step"] == 2
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), torch.from_numpy(gathered[n]), rtol=0, atol=0, msg=n)
    # whole -> FSDP ranks
    for n, p in ref.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(torch.from_numpy(loaded[n]), p.detach(), rtol=0, atol=0, msg=n)
    for i, p in enumerate(ref_opt.param_groups[0]["params"]):
        torch.testing.assert_close(torch.from_numpy(moments[i]), ref_opt.state[p]["exp_avg"], rtol=0, atol=0)


def test_bfloat16_base_trains_on_two_fsdp_workers(runs, assets, artifacts, store, tmp_path):
    """A bfloat16 base (LoRA factors and the head float32, the forward under CPU autocast) trains
    under FSDP with checkpointing and lands near the float32 run; its export still loads."""
    from peft import PeftModel

    from loraga_ray.models import load_model

    _, f32 = runs["cls", "fsdp"]
    opts, m = _run(assets, tmp_path, "bf16", train_strategy="fsdp", dtype="bfloat16", activation_checkpointing=True,
                   tracking_uri=store, **_kw(assets, artifacts, "cls"))
    assert m["done"] and all(torch.isfinite(torch.tensor(_losses(m))))
    assert _losses(m) == pytest.approx(_losses(f32), rel=0.05)
    model = PeftModel.from_pretrained(load_model(opts.model, task="seq-cls", num_labels=2, seed=0),
                                      str(tmp_path / "bf16" / "adapter"))
    loss, _ = _eval_loss(model, assets, "cls", "seq-cls")
    assert loss == pytest.approx(m["eval_loss"], rel=0.05)  # evaluated in float32 here, bf16 in the run


# ----------------------------------------------------------------------------- in one process
def test_bfloat16_base_keeps_the_initial_output(assets, artifacts):
    """build_model with a bfloat16 base: the base weights are bfloat16 (W0 - eta*B0A0 computed in
    float32, cast once), LoRA factors and the new head float32 once prepared; the initial output
    matches the float32 model's within one bfloat16 rounding (the bound of the core tests)."""
    from loraga_ray.core.artifact import InitArtifact
    from loraga_ray.models import resolve_model
    from loraga_ray.training.strategy import autocast_for, prepare

    opts = _opts(assets, "unused", artifact=artifacts["cls"])
    spec = resolve_model(opts.model, "seq-cls")
    art = InitArtifact.load(artifacts["cls"])
    batch = {"input_ids": torch.randint(5, 100, (4, 9)), "attention_mask": torch.ones(4, 9, dtype=torch.long)}
    outputs = {}
    for dtype in ("float32", "bfloat16"):
        model = prepare(build_model(opts, spec, "seq-cls", 2, art, dtype=dtype), strategy="ddp",
                        device=torch.device("cpu"), dtype=dtype, activation_checkpointing=False, world=1).eval()
        trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
        frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad and "weight" in n}
        assert set(trainable.values()) == {torch.float32}
        assert any("classifier" in n for n in trainable)
        assert set(frozen.values()) == {getattr(torch, dtype)}
        with torch.no_grad(), autocast_for(torch.device("cpu"), dtype)():
            outputs[dtype] = model(**batch).logits.float()
    a, b = outputs["float32"], outputs["bfloat16"]
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999
    assert (a - b).abs().max() <= 0.1 * a.abs().max()


def test_activation_checkpointing_gives_the_same_losses(assets, artifacts):
    """Three AdamW steps of the LoRA-GA causal LM with and without activation checkpointing
    (float32): the same losses (rtol 1e-5) and the same trained factors."""
    from loraga_ray.core.artifact import InitArtifact
    from loraga_ray.models import resolve_model
    from loraga_ray.training.strategy import prepare

    opts = _opts(assets, "unused", **_kw(assets, artifacts, "causal"))
    spec = resolve_model(opts.model, "causal-lm")
    art = InitArtifact.load(artifacts["causal"])
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(STEPS):
        ids = torch.randint(5, 100, (4, 12), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    results = {}
    for ckpt in (False, True):
        model = prepare(build_model(opts, spec, "causal-lm", 2, art), strategy="ddp", device=torch.device("cpu"),
                        dtype="float32", activation_checkpointing=ckpt, world=1)
        inner = model.base_model.model
        assert getattr(inner, "is_activation_checkpointing", None) == ckpt
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        losses = []
        for b in batches:
            model.train()
            loss = model(**b).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
        results[ckpt] = (losses, [p.detach().clone() for p in params])
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    for p, q in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the planner's training rows
GiB = 2**30


@pytest.fixture
def llama_dirs(tmp_path):
    from test_sharded import LLAMA2_7B

    out = {}
    for name, cfg in (("7b", LLAMA2_7B), ("70b", dict(LLAMA2_7B, hidden_size=8192, intermediate_size=28672,
                                                      num_hidden_layers=80, num_attention_heads=64,
                                                      num_key_value_heads=8))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        out[name] = str(tmp_path / name)
    return out


def _resources(n, gib):
    from loraga_ray.jobs.resources import WorkerResources

    return WorkerResources(workers=n, gpus=1.0, cpus=1.0, timeout=1.0, cuda=True, gpu_memory=int(gib * GiB), bf16=True)


def _topts(model, **kw):
    from loraga_ray.options import TrainOptions

    base = dict(model=model, data="x", out="x", init="lora-ga", task="causal-lm", max_length=512, batch_size=8, rank=8)
    base.update(kw)
    return TrainOptions(**base)


def test_train_rows_for_llama7b_and_70b(llama_dirs):
    from loraga_ray.jobs.train_strategy import decide_train
    from loraga_ray.planner import model_shape, train_rows

    shape = model_shape(llama_dirs["7b"], "causal-lm")
    ddp, fsdp = train_rows(shape, 4, 24 * GiB, "bfloat16", 8, 512, 8, activation_checkpointing=True)
    assert ddp.parts["base weights (bfloat16)"] == shape.total_params * 2
    assert fsdp.per_worker_bytes < ddp.per_worker_bytes
    f32 = train_rows(shape, 4, 24 * GiB, "float32", 8, 512, 8, activation_checkpointing=True)[0]
    assert f32.parts["base weights (float32)"] == 2 * ddp.parts["base weights (bfloat16)"]
    no_ckpt = train_rows(shape, 4, 24 * GiB, "bfloat16", 8, 512, 8)[0]
    act = lambda r: next(v for k, v in r.parts.items() if k.startswith("activations"))  # noqa: E731
    assert act(no_ckpt) > 4 * act(ddp)  # checkpointing keeps one input per block
    # the shipped A10G cluster (4 x 24 GB): bf16 + checkpointing, the base whole on each GPU fits
    d = decide_train(_topts(llama_dirs["7b"], workers=4, dtype="auto", activation_checkpointing=True), "causal-lm", 2,
                     _resources(4, 22))
    assert (d.strategy, d.dtype) == ("ddp", "bfloat16") and d.per_worker_bytes <= 22 * GiB
    # in float32 the 27 GB base does not fit one GPU: FSDP over 4 does
    d = decide_train(_topts(llama_dirs["7b"], workers=4, dtype="float32", activation_checkpointing=True), "causal-lm",
                     2, _resources(4, 22))
    assert d.strategy == "fsdp" and d.reason == "ddp does not fit"
    # 70B on 8 x 80 GB: FSDP
    d = decide_train(_topts(llama_dirs["70b"], workers=8, activation_checkpointing=True), "causal-lm", 2,
                     _resources(8, 80))
    assert (d.strategy, d.dtype) == ("fsdp", "bfloat16") and d.per_worker_bytes <= 80 * GiB


def test_train_that_fits_nowhere_is_refused_with_the_numbers(llama_dirs):
    from loraga_ray.jobs.init_strategy import PlanError
    from loraga_ray.jobs.train_strategy import decide_train

    with pytest.raises(PlanError, match=r"fits under no strategy: per worker ddp \d+\.\d\d GiB.*--activation-checkpointing"):
        decide_train(_topts(llama_dirs["70b"], workers=1), "causal-lm", 2, _resources(1, 80))


def test_fit_refuses_before_any_worker_or_estimate(ray_session, assets, tmp_path, monkeypatch):
    """On GPUs too small for the run, fit fails before the init estimate or a Train worker starts,
    and writes nothing."""
    import loraga_ray.jobs.train as train_job
    from loraga_ray.jobs.init_strategy import PlanError

    monkeypatch.setattr(train_job, "plan_train_workers", lambda opts: _resources(opts.workers, 1e-4))
    monkeypatch.setattr(train_job, "estimate_artifact", lambda *a, **k: pytest.fail("the estimate started"))
    monkeypatch.setattr(train_job, "build_trainer", lambda *a, **k: pytest.fail("the trainer was built"))
    out = tmp_path / "never"
    with pytest.raises(PlanError, match="fits under no strategy"):
        fit(_opts(assets, out))
    assert not out.exists() or not any(out.iterdir())


def test_fsdp_on_a_model_without_blocks_is_refused():
    from loraga_ray.training.strategy import StrategyError, shard

    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(StrategyError, match="no repeated blocks.*--train-strategy ddp"):
        shard(mlp, torch.device("cpu"), "float32")
