"""`loraga-ray plan`: per-worker memory of init and train from a config alone. A Llama-2-7B-shaped
config.json (written here, no weights): 6,476,005,376 target parameters, 24.1 GiB of float32
sums; on 4 x 24 GiB init needs and fits `sharded`; on 1 x 24 GiB it fits on no strategy."""

from __future__ import annotations

import json

import pytest

from loraga_ray.planner import GiB, activation_bytes, model_shape, parse_bytes, plan, refusal


@pytest.fixture(scope="module")
def llama7b(tmp_path_factory):
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("llama-2-7b")
    LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    assert not list(folder.glob("*.safetensors"))  # a config is all the planner reads
    return str(folder)


def test_counts_of_a_7b_model(llama7b):
    shape = model_shape(llama7b)
    assert shape.target_params == 6_476_005_376 and shape.num_targets == 7 * 32 and shape.blocks == 32
    assert shape.target_params * 4 / GiB == pytest.approx(24.12, abs=0.01)  # the float32 sums alone
    assert shape.block_target_params * 32 == shape.target_params  # every target sits in a block
    assert shape.lora_params_per_rank == 32 * (4 * 2 * 4096 + 3 * (4096 + 11008))


def test_sharded_init_fits_on_four_24gib_gpus_and_nothing_fits_on_one(llama7b):
    four = plan(llama7b, gpus=4, gpu_memory="24GiB", max_length=512)
    rows = {r["strategy"]: r for r in four["init"]["rows"]}
    assert four["init"]["strategy"] == "sharded" and four["init"]["fits"]
    assert not rows["replicated"]["fits"] and rows["replicated"]["per_worker_bytes"] > 48 * GiB
    sharded = rows["sharded"]
    assert sharded["per_worker_bytes"] <= 24 * GiB == four["gpu_memory_bytes"]
    assert sharded["parts"]["float32 sums (1/N)"] == 6_476_005_376  # 1/4 of the 4-byte sums
    one = plan(llama7b, gpus=1, gpu_memory="24GiB", max_length=512)
    assert one["init"]["strategy"] is None and not one["init"]["fits"]
    message = refusal(one, "init")
    assert "fits on no strategy with 1 x 24.00 GiB" in message and "Use more GPUs" in message
    # train: a bfloat16 base (13.5 GB for 7B) with the whole batch of 8 x 512 on one GPU does not fit
    assert not one["train"]["fits"] and one["train"]["rows"][0]["parts"]["base weights (bfloat16)"] \
        == model_shape(llama7b).total_params * 2
    assert [r["strategy"] for r in one["train"]["rows"]] == ["ddp"]  # one worker: nothing to shard over
    assert four["train"]["strategy"] == "ddp" and four["train"]["fits"]  # 2 examples per GPU: the base fits whole


def test_activation_estimate_scales_with_the_micro_batch(llama7b):
    shape = model_shape(llama7b)
    assert activation_bytes(shape, 4, 512, 2) == 4 * activation_bytes(shape, 1, 512, 2)
    assert activation_bytes(shape, 1, 512, 2) == 512 * 4096 * 34 * 32 + 512 * 32000 * 4


def test_cli_json_and_bad_input(llama7b, capsys):
    from loraga_ray.cli import main

    assert main(["plan", "--model", llama7b, "--gpus", "4", "--gpu-memory", "24GiB", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    for stage in ("init", "train"):
        assert set(p[stage]) >= {"strategy", "per_worker_bytes", "fits"}
    assert p["init"]["strategy"] == "sharded" and p["train"]["strategy"] == "ddp"
    assert main(["plan", "--model", llama7b, "--gpus", "1", "--gpu-memory", "24GiB", "--json"]) == 3  # nothing fits
    capsys.readouterr()
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("24GiB") == 24 * GiB
    assert main(["plan", "--model", llama7b, "--gpus", "4", "--gpu-memory", "lots"]) == 1
    assert "cannot read the size 'lots'" in capsys.readouterr().err
