"""The convergence benchmark's report: the figures the README quotes come from these functions,
so they are checked on a hand-made record whose answers are known."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def conv(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("convergence_bench", ROOT / "benchmarks" / "convergence.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "RESULTS", tmp_path)
    return mod


def _history(losses):
    return [{"step": i + 1, "train_loss": v} for i, v in enumerate(losses)]


def _run(init, seed, acc, losses, lr=1e-4):
    from loraga_ray.curves import final_train_loss

    hist = _history(losses)
    return {"config": {"init": init, "lr": lr, "seed": seed}, "test": {"test_accuracy": acc}, "history": hist,
            "final_train_loss": final_train_loss(hist), "stage": "main"}


def _record():
    steps = 40
    lora = [1.0 - 0.5 * i / (steps - 1) for i in range(steps)]        # ends near 0.5 (last-10 mean 0.56)
    fast = [1.0 - 0.5 * min(1.0, 3 * i / (steps - 1)) for i in range(steps)]  # gets there about 3x sooner
    flat = [0.9] * steps                                             # never gets there
    runs = [_run("lora", s, 0.70 + 0.01 * s, lora, lr=1e-3) for s in (0, 1)]
    runs += [_run("lora-ga", s, 0.80, fast) for s in (0, 1)]
    runs += [_run("pissa", 0, 0.6, flat), _run("pissa", 1, 0.6, fast)]
    return {"experiment": "x", "metric": "test_accuracy", "rank": 8, "alpha": 16.0, "runs": runs,
            "settings": {"model": "m", "data": "d", "max_steps": steps, "batch_size": 4, "max_length": 8,
                         "lr_grid": [1e-4, 1e-3], "seeds": [0, 1], "test_limit": None},
            "lr_grid": {"lora": [{"lr": 1e-4, "val": 0.5}, {"lr": 1e-3, "val": 0.7}]}, "timings": {"total_s": 60.0}}


def test_summary_reach_and_spread(conv):
    from loraga_ray.curves import steps_to_reach

    rec = _record()
    s = conv.summarise(rec)
    assert s["lora"]["mean"] == pytest.approx(0.705) and s["lora"]["std"] == pytest.approx(math.sqrt(0.5) * 0.01)
    target = rec["runs"][0]["final_train_loss"]
    # LoRA-GA's curve is LoRA's compressed 3x in time: it gets to LoRA's final loss in about a third of the steps
    want = steps_to_reach(rec["runs"][2]["history"], target)
    assert s["lora-ga"]["reach"] == [want, want] and s["lora-ga"]["reached"] == 2
    assert want <= rec["settings"]["max_steps"] / 3 + 10  # the moving mean's 10-step lag at most
    # a method that gets there in one seed only is not given the mean of that seed
    reach, frac = conv._reach_text(s["pissa"], 40)
    assert s["pissa"]["reached"] == 1 and "1/2 seeds" in reach and frac == ""
    assert conv._reach_text(s["lora-ga"], 40)[1] == f"{want / 40:.2f}"


def test_report_and_headline_files(conv, tmp_path):
    (tmp_path / "convergence").mkdir()
    (tmp_path / "convergence" / "x.json").write_text(json.dumps(_record()))
    text = conv.report("x")
    assert "| lora-ga | 0.0001 | 0.800 ± 0.000 | 2 |" in text
    assert "| pissa |" in text and "not within 40" in text
    assert (tmp_path / "convergence_x.md").read_text() == text
    head = conv.headline(["x", "missing"])
    assert "**LoRA-GA (loraga-ray)** | 0.800 ± 0.000 (n=2)" in head
    assert (tmp_path / "convergence.md").read_text() == head
    for f in ("convergence_x_loss.png", "convergence_x_metric.png", "convergence_loss.png"):
        assert (tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / f).stat().st_size > 10_000


def test_edge_rule(conv, tmp_path):
    grid = [1e-4, 3e-4, 1e-3]
    assert conv.edge_points(grid, {"a": 3e-4, "b": 3e-4}) == []
    assert conv.edge_points(grid, {"a": 1e-4, "b": 3e-4}) == [3e-5]
    assert conv.edge_points(grid, {"a": 1e-3}) == [3e-3]
    assert conv.edge_points(grid, {"a": 1e-4, "b": 1e-3}) == [3e-5, 3e-3]


def test_gpu_scale_script_runs_on_cpu_with_a_tiny_model(tmp_path):
    """The prepared single-GPU script (no Ray) runs end to end: every phase reports its figures,
    the estimate equals its own sums' size, and nothing is left as an error."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_scale.py"), "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_scale.json").read_text())
    for phase in ("limit", "estimate", "peft_preprocess_loraga"):
        assert result[phase]["tokens_per_s"] > 0, result[phase]
    assert result["estimate"]["sum_bytes"] == 4 * result["target_params"]
    assert result["svd"]["layers"] == 14 and result["svd"]["k"] == 16
    assert set(result["train"]) == {"plain", "checkpointing"}
    assert all("error" not in v for v in result["train"].values())


def test_protocols_pick_their_runs_under_the_chosen_head_rule(conv):
    """(b): each method at its chosen lr; (a): every LoRA method at the shared lr, full
    fine-tuning at its own; a run at lr >= the head floor belongs to both head rules."""
    def run(init, lr, seed, head_lr=None):
        r = _run(init, seed, 0.7, [1.0] * 20, lr=lr)
        r["config"]["head_lr"] = head_lr
        return r

    runs = [run("lora", 1e-3, 0), run("lora", 1e-4, 0), run("lora", 1e-4, 0, head_lr=1e-3),
            run("lora-ga", 1e-4, 0), run("lora-ga", 1e-4, 0, head_lr=1e-3), run("full", 3e-4, 0, head_lr=1e-3),
            run("full", 1e-4, 0, head_lr=1e-3)]
    rec = {"runs": runs, "chosen_lr": {"lora": 1e-3, "lora-ga": 1e-4, "full": 3e-4}, "shared_lr": 1e-4,
           "head_rule": "floor", "settings": {"methods": ["full", "lora", "lora-ga"]}}
    b = {(r["config"]["init"], r["config"]["lr"], r["config"]["head_lr"]) for r in conv.protocol_runs(rec, "b")}
    assert b == {("lora", 1e-3, None), ("lora-ga", 1e-4, 1e-3), ("full", 3e-4, 1e-3)}
    a = {(r["config"]["init"], r["config"]["lr"], r["config"]["head_lr"]) for r in conv.protocol_runs(rec, "a")}
    assert a == {("lora", 1e-4, 1e-3), ("lora-ga", 1e-4, 1e-3), ("full", 3e-4, 1e-3)}
    rec["head_rule"] = "tied"
    a = {(r["config"]["init"], r["config"]["lr"], r["config"]["head_lr"]) for r in conv.protocol_runs(rec, "a")}
    assert a == {("lora", 1e-4, None), ("lora-ga", 1e-4, None)}  # full has no tied run at its lr here
    assert conv.head_lr_of("floor", 1e-4) == 1e-3 and conv.head_lr_of("floor", 3e-3) is None
    assert conv.head_lr_of("tied", 1e-4) is None
