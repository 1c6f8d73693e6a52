"""LoRA-One from the LoRA-GA artifact, checked against the maths: eta*B0A0 is -eta/(gamma*s1)
times the best rank-r approximation of the gradient (float64 SVD of an independent float64
gradient), the base weights are kept, the adapter exports as a plain rank-r PEFT adapter, and
one artifact serves LoRA-One up to rank k."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from loraga_ray import ArtifactError, apply_lora_one, estimate_init, save_adapter
from loraga_ray.core.factors import LORA_ONE_GAMMA, lora_one_factors
from tiny import batches, make_examples, reference_gradients, tiny_bert, tiny_llama

MAX_RANK = 4  # k = 8 singular triplets per layer


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_initial_step_is_the_scaled_best_rank_r_approximation_of_minus_g(kind):
    model, task = (tiny_llama(), "causal-lm") if kind == "llama" else (tiny_bert(), "seq-cls")
    ex = make_examples(24, task, seed=3)
    art = estimate_init(model, batches(ex, 6, task), max_rank=MAX_RANK, svd="exact")
    grads = reference_gradients(model, ex, task, art.target_modules)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in art.target_modules}
    rank, alpha, gamma = 5, 8.0, 64.0  # rank 5 > max_rank 4: LoRA-One needs r triplets, not 2r
    pm = apply_lora_one(copy.deepcopy(model), art, rank=rank, alpha=alpha, gamma=gamma)
    inner = pm.base_model.model
    eta = alpha / rank**0.5
    for name, G in grads.items():
        U, S, Vh = torch.linalg.svd(-G, full_matrices=False)  # float64, exact
        best = (U[:, :rank] * S[:rank]) @ Vh[:rank]  # the best rank-r approximation of -G
        expected = eta / (gamma * float(S[0])) * best
        layer = inner.get_submodule(name)
        A = layer.lora_A["default"].weight.detach().double()
        B = layer.lora_B["default"].weight.detach().double()
        got = layer.scaling["default"] * (B @ A)
        assert layer.scaling["default"] == pytest.approx(eta)
        err = float((got - expected).norm() / expected.norm())
        assert err < 1e-4, f"{name}: relative error {err:.2e}"
        # A0 and B0 carry sqrt(s_i) each (balanced), the spectral norm of eta*B0A0 is eta/gamma
        torch.testing.assert_close(B.norm(dim=0), A.norm(dim=1), rtol=1e-4, atol=0)
        assert float(torch.linalg.matrix_norm(got, ord=2)) == pytest.approx(eta / gamma, rel=1e-4)
        # the base weight is kept (LoRA-One moves the model; LoRA-GA would subtract eta*B0A0)
        assert torch.equal(layer.get_base_layer().weight, before[name])
    # so the output changes, as one gradient step would change it
    batch = batches(ex, 24, task)[0]
    assert not torch.allclose(_logits(pm, batch), _logits(model, batch), atol=1e-5)


def test_one_step_lowers_the_loss_like_a_gradient_step():
    """The init is a descent step: with a gamma that keeps it small, the loss on the estimate's own
    sample goes down."""
    model = tiny_llama()
    ex = make_examples(24, "causal-lm", seed=4)
    art = estimate_init(model, batches(ex, 6, "causal-lm"), max_rank=MAX_RANK, svd="exact")
    b = batches(ex, 24, "causal-lm")[0]
    with torch.no_grad():
        base_loss = float(model(**b).loss)
        loss = float(apply_lora_one(copy.deepcopy(model), art, rank=4, alpha=16, gamma=8).eval()(**b).loss)
    assert loss < base_loss


def test_adapter_exports_as_plain_rank_r_peft_adapter(tmp_path):
    from peft import PeftModel

    model = tiny_bert()
    model.save_pretrained(tmp_path / "base")
    ex = make_examples(16, "seq-cls", seed=5)
    art = estimate_init(model, batches(ex, 8, "seq-cls"), max_rank=MAX_RANK)
    pm = apply_lora_one(copy.deepcopy(model), art, rank=3, alpha=6, modules_to_save=["classifier"])
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-3)
    for _ in range(3):
        for b in batches(ex, 8, "seq-cls"):
            opt.zero_grad()
            pm(**b).loss.backward()
            opt.step()
    pm.eval()
    batch = batches(ex, 16, "seq-cls")[0]
    trained = _logits(pm, batch)
    save_adapter(pm, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 6 and cfg["use_rslora"]  # not rewritten at 2r
    assert not (tmp_path / "adapter" / "loraga.json").exists()
    fresh = type(model).from_pretrained(tmp_path / "base").eval()
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    assert (_logits(loaded, batch) - trained).abs().max() <= 1e-4 * max(1.0, float(trained.abs().max()))


def test_rank_limits_and_bad_input_leave_the_model_alone():
    model = tiny_llama()
    ex = make_examples(8, "causal-lm", seed=6)
    art = estimate_init(model, batches(ex, 4, "causal-lm"), max_rank=2)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ArtifactError, match="rank <= 4"):
        apply_lora_one(model, art, rank=5, alpha=8)
    with pytest.raises(ValueError, match="gamma"):
        apply_lora_one(model, art, rank=2, alpha=8, gamma=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert not hasattr(model, "peft_config")
    # one artifact, both methods, any rank it holds
    apply_lora_one(copy.deepcopy(model), art, rank=4, alpha=8)


def test_factors_follow_the_authors_formula():
    """B = U'_r sqrt(S_r) / sqrt(S_1) / sqrt(gamma), A = sqrt(S_r) V_r^T / sqrt(S_1) / sqrt(gamma),
    with U' the left vectors of -G (here: -U of G), written out directly."""
    g = torch.Generator().manual_seed(0)
    G = torch.randn(12, 7, generator=g, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    f = lora_one_factors(U.float(), S.float(), Vh.T.float(), rank=3, alpha=4.0)
    s = S[:3].sqrt() / (S[0] * LORA_ONE_GAMMA).sqrt()
    torch.testing.assert_close(f.B.double(), -U[:, :3] * s, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(f.A.double(), s[:, None] * Vh[:3], rtol=1e-5, atol=1e-7)
    assert f.eta == pytest.approx(4.0 / 3**0.5)
