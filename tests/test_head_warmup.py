"""--head-warmup-steps: the new classifier head is fitted alone before the gradient is taken. The
init pipeline's warmed head and gradient equal a single-process warm-up + estimate_init on the
same sample; a run of any other init (LoRA: LP-FT) warms its head to the same values; a run
from an artifact must ask for the warm-up its head had."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from loraga_ray import estimate_init
from loraga_ray.core.head import HeadWarmupError, check_artifact_warmup, warm_up_head
from loraga_ray.options import InitOptions, TrainOptions
from tiny import batches, make_examples, tiny_bert, tiny_llama

STEPS, LR, SAMPLES, BATCH, LENGTH = 6, 1e-2, 24, 4, 24
WORDS = "the a movie film plot actor great bad boring fun slow brilliant awful dull witty".split()


def test_warm_up_fits_the_head_alone_and_restores_the_model():
    model = tiny_bert(0).train()
    data = batches(make_examples(16, "seq-cls", seed=1), 4, "seq-cls")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # a flag the warm-up must give back
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    seen = []
    stats = warm_up_head(model, data, ["classifier"], steps=12, lr=3e-2, on_step=seen.append)
    assert seen == list(range(1, 13)) and stats["steps"] == 12 and stats["batch_size"] == 4
    # the head fits the frozen features: its loss on the batches it cycles through falls
    assert stats["loss_last"] < stats["loss_first"] - 0.01
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == n.startswith("classifier."), n  # only the head moved
        assert p.requires_grad == flags[n] and p.grad is None
    assert model.training  # the mode it had
    with pytest.raises(HeadWarmupError, match="has none"):
        warm_up_head(tiny_llama(), batches(make_examples(4, "causal-lm"), 4, "causal-lm"), [], steps=2, lr=1e-3)
    with pytest.raises(HeadWarmupError, match="positive integer"):
        warm_up_head(model, data, ["classifier"], steps=0, lr=1e-3)


def test_options_refuse_what_cannot_run():
    with pytest.raises(ValueError, match="--head-warmup-steps must be an integer >= 0"):
        InitOptions(model="m", data="d", head_warmup_steps=-1).validate()
    with pytest.raises(ValueError, match="--head-warmup-lr must be a positive number"):
        TrainOptions(model="m", data="d", out="o", head_warmup_steps=2, head_warmup_lr=0).validate()
    with pytest.raises(ValueError, match="does not run with --init-strategy sharded"):
        InitOptions(model="m", data="d", head_warmup_steps=2, init_strategy="sharded").validate()
    with pytest.raises(ValueError, match="does not run with --init-strategy sharded"):  # before a run or search starts
        TrainOptions(model="m", data="d", out="o", head_warmup_steps=2, init_strategy="sharded").validate()
    # a run's warm-up reaches the estimate it starts
    init = TrainOptions(model="m", data="d", out="o", head_warmup_steps=3, head_warmup_lr=2e-3).init_options(
        out=None, max_rank=4, task="seq-cls", num_labels=2)
    assert (init.head_warmup_steps, init.head_warmup_lr) == (3, 2e-3)


def test_a_run_must_ask_for_the_warm_up_its_artifacts_head_had():
    warmed = {"head": {"seed": 0, "warmup": {"steps": 6, "lr": 0.01}}}
    check_artifact_warmup(warmed, 6, 0.01, "art")
    with pytest.raises(HeadWarmupError, match=r"fitted with 6 step\(s\) at lr 0.01, but this run asks for no "
                                              r"warm-up: pass --head-warmup-steps 6 --head-warmup-lr 0.01"):
        check_artifact_warmup(warmed, 0, 1e-3, "art")
    with pytest.raises(HeadWarmupError, match="at lr 0.01, but this run asks for 6 step"):
        check_artifact_warmup(warmed, 6, 1e-3, "art")
    # an artifact written before the warm-up existed (no "warmup" entry) had none
    check_artifact_warmup({"head": {"seed": 0}}, 0, 1e-3, "art")
    with pytest.raises(HeadWarmupError, match="fitted with no warm-up"):
        check_artifact_warmup({"head": {"seed": 0}}, 4, 1e-3, "art")
    check_artifact_warmup({}, 4, 1e-3, "art")  # no head (a causal LM): nothing to match
    warmed["head"]["warmup"]["batch_size"] = 8
    check_artifact_warmup(warmed, 6, 0.01, "art", batch_size=8)
    with pytest.raises(HeadWarmupError, match="fitted in batches of 8, but this run's --init-batch-size is 4"):
        check_artifact_warmup(warmed, 6, 0.01, "art", batch_size=4)


def test_a_bfloat16_base_fits_a_float32_head_and_keeps_its_dtypes():
    model = tiny_bert(0).to(torch.bfloat16)
    data = batches(make_examples(16, "seq-cls", seed=1), 4, "seq-cls")
    before = model.classifier.weight.detach().clone()
    stats = warm_up_head(model, data, ["classifier"], steps=12, lr=3e-2)
    assert stats["loss_last"] < stats["loss_first"]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # as it was
    assert not torch.equal(model.classifier.weight, before)
    # a base with float32 parts (modules kept in float32) runs under autocast in its 16-bit dtype
    from loraga_ray.core.head import _lowest_float_dtype

    mixed = [torch.zeros(1), torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.int64)]
    assert _lowest_float_dtype(mixed) == torch.bfloat16 and _lowest_float_dtype(mixed[:1]) == torch.float32
    # the batch size recorded is the one asked for, also when the sample is smaller than a batch
    assert warm_up_head(tiny_bert(0), data[:1], ["classifier"], steps=1, lr=1e-3, batch_size=8)["batch_size"] == 8


def test_a_causal_lm_run_is_refused_before_anything_loads():
    from loraga_ray.jobs.run_plan import plan_run

    opts = TrainOptions(model="demo-smollm2", data="demo-arithmetic", out="o", init="lora", head_warmup_steps=2)
    with pytest.raises(ValueError, match="this causal-lm run has none"):
        plan_run(opts)


@pytest.fixture(scope="module")
def assets(tiny_bert_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("warmup")
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 15)))) for _ in range(40)]
    # a label the words decide, so the head has something to fit
    labels = [int(sum(w in ("great", "fun", "brilliant", "witty") for w in t.split()) > 0) for t in texts]
    pq.write_table(pa.table({"text": texts, "label": labels}), root / "reviews.parquet")
    return {"model": str(tiny_bert_dir), "data": str(root / "reviews.parquet")}


def _sample_batches(model_dir: str, data: str):
    from loraga_ray.data import Encoder, iter_batches, load_split, sample_table
    from loraga_ray.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sample = sample_table(load_split(data), SAMPLES, 0)
    return list(iter_batches(sample, Encoder(tok, "seq-cls", LENGTH), BATCH, tok.pad_token_id, "seq-cls"))


@pytest.fixture(scope="module")
def warmed(ray_session, assets, tmp_path_factory):
    """The init pipeline's artifact with the warm-up (2 workers) and its summary."""
    from loraga_ray.jobs.init import run_init

    out = tmp_path_factory.mktemp("warmed") / "art"
    opts = InitOptions(model=assets["model"], data=assets["data"], num_samples=SAMPLES, batch_size=BATCH, max_rank=2,
                       svd="exact", max_length=LENGTH, progress=False, workers=2, head_warmup_steps=STEPS,
                       head_warmup_lr=LR, out=str(out))
    art, summary = run_init(opts)
    return art, summary, out


def _train_opts(assets, tmp_path, init: str, **kw) -> TrainOptions:
    return TrainOptions(model=assets["model"], data=assets["data"], out=str(tmp_path / "run"), init=init, rank=2,
                        init_samples=SAMPLES, init_batch_size=BATCH, max_length=LENGTH, head_warmup_steps=STEPS,
                        head_warmup_lr=LR, **kw)


def _trained_head(model, init: str):
    """The head a training run starts from, under each init's wrapping."""
    if init == "full":
        return model.classifier
    return model.base_model.model.classifier.modules_to_save["default"]


def test_pipeline_warm_up_equals_single_process(warmed, assets):
    from loraga_ray.core.artifact import InitArtifact
    from loraga_ray.jobs.init import format_summary
    from loraga_ray.models import load_model, resolve_model

    art, summary, out = warmed
    warm = art.meta["head"]["warmup"]
    assert (warm["steps"], warm["lr"], warm["batch_size"]) == (STEPS, LR, BATCH)
    assert warm["loss_last"] < warm["loss_first"]
    assert "head warm-up 6 steps of 4 at lr 0.01" in format_summary(summary)

    # reference: one process, the same sample and batches, warm-up then estimate_init
    model = load_model(resolve_model(assets["model"]), seed=0)
    fresh = {n: p.detach().clone() for n, p in model.classifier.named_parameters()}
    data = _sample_batches(assets["model"], assets["data"])
    stats = warm_up_head(model, data, ["classifier"], steps=STEPS, lr=LR)
    ref = estimate_init(model, data, max_rank=2, svd="exact", seed=0, warmup=stats)
    assert ref.meta["head"]["warmup"]["steps"] == STEPS  # the API records the warm-up too
    loaded = InitArtifact.load(out)
    for name, t in ref.head.items():
        torch.testing.assert_close(loaded.head[name], t, rtol=0, atol=1e-6)
        assert not torch.allclose(t, fresh[name.split(".", 1)[1]], atol=1e-3)  # the warm-up moved it
    assert loaded.meta["fingerprint"] == ref.meta["fingerprint"]  # the fingerprint covers the warmed head
    for name in ref.target_modules:  # the gradient went through the warmed head
        U, S, V = loaded.factors[name]
        Ur, Sr, Vr = ref.factors[name]
        torch.testing.assert_close(S, Sr, rtol=1e-4, atol=1e-6 * float(Sr[0]))
        G, Gr = U @ torch.diag(S) @ V.T, Ur @ torch.diag(Sr) @ Vr.T
        assert float((G - Gr).norm() / Gr.norm()) < 1e-3, name


@pytest.mark.parametrize("init", ["lora", "full", "pissa", "peft-lora-ga"])
def test_every_other_init_fits_the_same_head(warmed, assets, tmp_path, init):
    """LP-FT: a run of an init without an artifact fits its head to the artifact's values."""
    from loraga_ray.models import resolve_model
    from loraga_ray.training import build

    from loraga_ray.jobs.run_plan import plan_run
    from loraga_ray.jobs.train import estimate_sample, needs_estimate_sample

    art, _, _ = warmed
    said = []
    opts = _train_opts(assets, tmp_path, init)
    assert needs_estimate_sample(opts)
    # lora and peft-lora-ga as a Train worker gets it: the sample the driver drew; the others read it
    sample = estimate_sample(opts, plan_run(opts)) if init in ("lora", "peft-lora-ga") else None
    model = build.build_model(opts, resolve_model(assets["model"]), "seq-cls", 2, report=said.append,
                              estimate_sample=sample)
    head = _trained_head(model, init)
    torch.testing.assert_close(head.weight.detach(), art.head["classifier.weight"], rtol=0, atol=1e-6)
    torch.testing.assert_close(head.bias.detach(), art.head["classifier.bias"], rtol=0, atol=1e-6)
    assert len(said) == 1 and said[0].startswith("head warm-up: 6 steps of 4 at lr 0.01, loss ")


def test_artifact_inits_take_the_head_as_it_is_and_restarts_skip_the_fit(warmed, assets, tmp_path, monkeypatch):
    from loraga_ray.core.artifact import InitArtifact
    from loraga_ray.models import resolve_model
    from loraga_ray.training import build

    art, _, out = warmed
    spec = resolve_model(assets["model"])
    real = build.warm_up_run_head
    monkeypatch.setattr(build, "warm_up_run_head", lambda *a, **k: pytest.fail("the head was fitted again"))
    for init in ("lora-ga", "lora-one"):  # from the artifact: its head, not fitted again
        model = build.build_model(_train_opts(assets, tmp_path, init), spec, "seq-cls", 2, InitArtifact.load(out))
        assert torch.equal(_trained_head(model, init).weight.detach(), art.head["classifier.weight"])
    # a worker restarting from a checkpoint does not fit it (the checkpoint holds the trained head) ...
    build.build_model(_train_opts(assets, tmp_path, "lora"), spec, "seq-cls", 2, restarting=True)
    # ... but PEFT's LoRA-GA does: its init (and the base weight it leaves) goes through the head
    calls = []
    monkeypatch.setattr(build, "warm_up_run_head", lambda *a, **k: calls.append(1) or real(*a, **k))
    build.build_model(_train_opts(assets, tmp_path, "peft-lora-ga"), spec, "seq-cls", 2, restarting=True)
    assert calls == [1]


def test_a_run_from_the_artifact_is_checked_before_anything_loads(warmed, assets, tmp_path):
    from loraga_ray.core.artifact import InitArtifact
    from loraga_ray.jobs.run_plan import plan_run

    _, _, out = warmed
    art = InitArtifact.load(out)
    plan_run(_train_opts(assets, tmp_path, "lora-ga", artifact=str(out)), art)  # the same warm-up: fine
    with pytest.raises(HeadWarmupError, match="pass --head-warmup-steps 6 --head-warmup-lr 0.01"):
        plan_run(replace(_train_opts(assets, tmp_path, "lora-ga", artifact=str(out)), head_warmup_steps=0), art)
    with pytest.raises(HeadWarmupError, match="Pass --init-batch-size 4"):
        plan_run(replace(_train_opts(assets, tmp_path, "lora-one", artifact=str(out)), init_batch_size=8), art)


def test_train_job_starts_lora_from_the_warmed_head(warmed, assets, tmp_path, mlflow_store):
    """Through Ray Train on 2 workers (DDP): the driver draws the sample, each worker fits the
    head on it; at a vanishing lr the exported head is the artifact's warmed head."""
    from mlflow.tracking import MlflowClient
    from peft import PeftModel

    from loraga_ray.jobs.train import fit
    from loraga_ray.models import load_model

    art, _, _ = warmed
    opts = _train_opts(assets, tmp_path, "lora", lr=1e-12, head_lr=1e-12, max_steps=2, batch_size=4, workers=2,
                       eval_every=2, device="cpu", tracking_uri=mlflow_store)
    m = fit(opts)
    assert m["done"]
    model = PeftModel.from_pretrained(load_model(assets["model"], task="seq-cls"), str(tmp_path / "run" / "adapter"))
    head = model.base_model.model.classifier.modules_to_save["default"]
    torch.testing.assert_close(head.weight.detach(), art.head["classifier.weight"], rtol=0, atol=1e-5)
    params = MlflowClient(tracking_uri=mlflow_store).get_run(m["mlflow_run_id"]).data.params
    assert (params["head_warmup_steps"], float(params["head_warmup_lr"])) == ("6", LR)


def test_a_searchs_best_trial_command_keeps_the_warm_up():
    from loraga_ray.jobs.search_results import best_record
    from loraga_ray.spaces import parse_space

    base = TrainOptions(model="m", data="d", out="o", init="lora", head_warmup_steps=64, head_warmup_lr=1e-2)
    best = {"trial_id": "t0", "lr": 1e-3, "init": "lora", "eval_loss": 0.5, "steps": 80, "time_s": 1.0,
            "status": "completed"}
    record = best_record(best, parse_space({"lr": {"grid": [1e-4, 1e-3]}}), base)
    assert record["train_command"].endswith("--lr 0.001 --init lora --head-warmup-steps 64 --head-warmup-lr 0.01")
