"""--head-warmup-steps: the new classifier head is fitted alone before the gradient is taken. The
init pipeline's warmed head and gradient equal a single-process warm-up + estimate_init on the
same sample; a run of any other init (LoRA: LP-FT) warms its head to the same values; a run
from an artifact must ask for the warm-up its head had."""

from __future__ import annotations

import warnings

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


def test_pipeline_warm_up_equals_single_process_and_lp_ft_gets_the_same_head(ray_session, assets, tmp_path):
    from loraga_ray.core.artifact import InitArtifact
    from loraga_ray.jobs.init import format_summary, run_init
    from loraga_ray.models import load_model, resolve_model
    from loraga_ray.training import build

    opts = InitOptions(model=assets["model"], data=assets["data"], num_samples=SAMPLES, batch_size=BATCH, max_rank=2,
                       svd="exact", max_length=LENGTH, progress=False, workers=2, head_warmup_steps=STEPS,
                       head_warmup_lr=LR, out=str(tmp_path / "art"))
    art, summary = run_init(opts)
    warm = art.meta["head"]["warmup"]
    assert (warm["steps"], warm["lr"], warm["batch_size"]) == (STEPS, LR, BATCH)
    assert warm["loss_last"] < warm["loss_first"]
    assert "head warm-up 6 steps of 4 at lr 0.01" in format_summary(summary)

    # reference: one process, the same sample and batches, warm-up then estimate_init
    spec = resolve_model(assets["model"])
    model = load_model(spec, seed=0)
    fresh = {n: p.detach().clone() for n, p in model.classifier.named_parameters()}
    data = _sample_batches(assets["model"], assets["data"])
    warm_up_head(model, data, ["classifier"], steps=STEPS, lr=LR)
    ref = estimate_init(model, data, max_rank=2, svd="exact", seed=0)
    loaded = InitArtifact.load(tmp_path / "art")
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

    # a plain LoRA run with the same warm-up (LP-FT) starts from the artifact's head, fitted anew
    topts = TrainOptions(model=assets["model"], data=assets["data"], out=str(tmp_path / "run"), init="lora", rank=2,
                         init_samples=SAMPLES, init_batch_size=BATCH, max_length=LENGTH, head_warmup_steps=STEPS,
                         head_warmup_lr=LR)
    lora = build.build_model(topts, spec, "seq-cls", 2)
    head = lora.base_model.model.classifier.modules_to_save["default"]
    torch.testing.assert_close(head.weight.detach(), loaded.head["classifier.weight"], rtol=0, atol=1e-6)
    torch.testing.assert_close(head.bias.detach(), loaded.head["classifier.bias"], rtol=0, atol=1e-6)
    # and LoRA-GA from the artifact takes that head as it is, without fitting it again
    ga = build.build_model(TrainOptions(**{**topts.__dict__, "init": "lora-ga"}), spec, "seq-cls", 2, loaded)
    ga_head = ga.base_model.model.classifier.modules_to_save["default"]
    assert torch.equal(ga_head.weight.detach(), loaded.head["classifier.weight"])
