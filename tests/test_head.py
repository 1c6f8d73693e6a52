"""The classifier head travels with the init artifact: the gradient went through it, so every
run trained from the artifact starts from it, whatever seed the run itself uses."""

from __future__ import annotations

import pytest
import torch

from loraga_ray import ArtifactError, InitArtifact, apply_lora_ga, estimate_init
from loraga_ray.core.artifact import HEAD_FILE, weight_fingerprint
from tiny import batches, make_examples, tiny_bert, tiny_llama


def _head(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("classifier.")}


def _other_head(seed: int):
    """The tiny BERT with the same encoder as seed 0 and the head a run at ``seed`` would draw."""
    model = tiny_bert(0)
    torch.manual_seed(seed)
    model.classifier.reset_parameters()
    return model


@pytest.fixture(scope="module")
def estimated():
    model = tiny_bert(0)
    ex = make_examples(16, "seq-cls", seed=1)
    return model, ex, estimate_init(model, batches(ex, 4, "seq-cls"), max_rank=2, svd="exact", seed=0)


def test_estimate_keeps_the_head(estimated):
    model, _, art = estimated
    assert sorted(art.head) == ["classifier.bias", "classifier.weight"]
    for n, t in _head(model).items():
        assert torch.equal(art.head[n], t)
    assert art.meta["head"]["seed"] == 0 and art.meta["head"]["modules"] == ["classifier"]
    # the fingerprint covers the head: the same targets under another head give another one
    assert weight_fingerprint(model, art.target_modules, art.head) == art.meta["fingerprint"]
    assert weight_fingerprint(model, art.target_modules, _head(_other_head(1))) != art.meta["fingerprint"]
    assert not estimate_init(tiny_llama(), batches(make_examples(4, "causal-lm"), 4, "causal-lm"), max_rank=2).head


def test_other_seed_starts_from_the_artifacts_head(estimated, tmp_path):
    """A run at seed 1 loads a model with another head; LoRA-GA from the artifact (estimated at
    seed 0) replaces it with the artifact's, so its first output is the seed-0 model's."""
    model, ex, art = estimated
    art.save(tmp_path / "art")
    loaded = InitArtifact.load(tmp_path / "art")
    assert loaded.meta["head"]["sha256"] and (tmp_path / "art" / HEAD_FILE).is_file()
    other = _other_head(1)
    assert not torch.equal(other.classifier.weight, model.classifier.weight)
    peft = apply_lora_ga(other, loaded, rank=2, alpha=4.0, modules_to_save=["classifier"])
    trained = peft.base_model.model.classifier.modules_to_save["default"]
    assert torch.equal(trained.weight, art.head["classifier.weight"])
    assert torch.equal(trained.bias, art.head["classifier.bias"])
    batch = next(iter(batches(ex, 8, "seq-cls")))
    with torch.no_grad():
        torch.testing.assert_close(peft(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-6)


def test_build_model_at_another_seed_uses_the_artifacts_head(estimated, tmp_path, monkeypatch):
    """What a Train worker builds for --init lora-ga --seed 1 from a seed-0 artifact."""
    from loraga_ray.options import TrainOptions
    from loraga_ray.training import build

    model, _, art = estimated
    monkeypatch.setattr("loraga_ray.models.load_model", lambda *a, seed=0, **k: _other_head(seed))
    opts = TrainOptions(model="tiny", data="x", out=str(tmp_path), init="lora-ga", rank=2, alpha=4.0, seed=1)
    peft = build.build_model(opts, None, "seq-cls", 2, art)
    head = peft.base_model.model.classifier.modules_to_save["default"]
    assert torch.equal(head.weight, art.head["classifier.weight"])
    assert not torch.equal(head.weight, _other_head(1).classifier.weight)


def test_damaged_or_mismatched_head_is_refused(estimated, tmp_path):
    from safetensors.torch import save_file

    _, _, art = estimated
    art.save(tmp_path / "art")
    save_file({n: t + 1 for n, t in art.head.items()}, str(tmp_path / "art" / HEAD_FILE))
    with pytest.raises(ArtifactError, match="head and the factors come from different writes"):
        InitArtifact.load(tmp_path / "art")
    (tmp_path / "art" / HEAD_FILE).unlink()
    with pytest.raises(ArtifactError, match=f"{HEAD_FILE} is missing"):
        InitArtifact.load(tmp_path / "art")
    from transformers import BertForSequenceClassification

    cfg = tiny_bert(0).config
    cfg.num_labels = 3
    three = BertForSequenceClassification(cfg)
    three.load_state_dict({k: v for k, v in tiny_bert(0).state_dict().items() if not k.startswith("classifier.")},
                          strict=False)
    before = {k: v.clone() for k, v in three.state_dict().items()}
    with pytest.raises(ArtifactError, match=r"estimated with 2 classes"):
        apply_lora_ga(three, art, rank=2, alpha=4.0)
    assert all(torch.equal(before[k], v) for k, v in three.state_dict().items())  # left as it was


@pytest.mark.parametrize("init", ["lora-ga", "lora", "full"])
def test_head_lr_is_a_parameter_group_of_its_own(estimated, tmp_path, monkeypatch, init):
    """--head-lr: the new head trains at its own lr under every --init, and the schedule scales
    both groups alike (train_step sets lr = peak_lr * factor per group)."""
    from loraga_ray.core.targets import CLASSIFIER_HEADS
    from loraga_ray.options import TrainOptions
    from loraga_ray.training import build
    from loraga_ray.training.checkpoints import trainable_parameters
    from loraga_ray.training.loop import param_groups

    _, _, art = estimated
    monkeypatch.setattr("loraga_ray.models.load_model", lambda *a, seed=0, **k: _other_head(seed))
    opts = TrainOptions(model="tiny", data="x", out=str(tmp_path), init=init, rank=2, alpha=4.0, lr=1e-4, head_lr=3e-3)
    model = build.build_model(opts, None, "seq-cls", 2, art if init == "lora-ga" else None)
    named = trainable_parameters(model)
    groups = param_groups(named, opts, CLASSIFIER_HEADS)
    assert [(g["name"], g["peak_lr"]) for g in groups] == [("adapter", 1e-4), ("head", 3e-3)]
    ids = {id(p): n for n, p in named}
    head_names = sorted(ids[id(p)] for p in groups[1]["params"])
    assert head_names and all("classifier" in n for n in head_names)
    assert all("classifier" not in ids[id(p)] for p in groups[0]["params"])
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(named)
    default = param_groups(named, TrainOptions(model="m", data="d", out="o", lr=1e-4), CLASSIFIER_HEADS)
    assert [g["peak_lr"] for g in default] == [1e-4, 1e-4]  # without --head-lr: --lr for both


def test_early_evaluations_cover_the_first_steps_only():
    from loraga_ray.options import TrainOptions
    from loraga_ray.training.loop import is_early_eval

    opts = TrainOptions(model="m", data="d", out="o", max_steps=80, eval_every=80, eval_early_every=5, eval_early_until=40)
    assert [s for s in range(1, 81) if is_early_eval(s, opts)] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert not any(is_early_eval(s, TrainOptions(model="m", data="d", out="o")) for s in range(1, 81))
    with pytest.raises(ValueError, match="--eval-early-every must be a positive integer"):
        TrainOptions(model="m", data="d", out="o", eval_early_every=0).validate()
