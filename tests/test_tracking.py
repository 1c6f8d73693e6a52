"""MLflow helpers and plots, without Ray: stores, runs with parents, metrics from reports,
the init artifact's record, and the errors for stores that cannot be opened."""

from __future__ import annotations

import pickle
import socket
import time
from pathlib import Path

import pytest
import torch

from loraga_ray import tracking
from loraga_ray.plots import plot_loss_curve, plot_singular_values

PNG = b"\x89PNG\r\n\x1a\n"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store_dir(mlflow_store_dir):
    return mlflow_store_dir


@pytest.fixture(scope="module")
def store(mlflow_store):
    return mlflow_store


def test_default_uri_is_absolute_sqlite_in_the_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = tracking.default_tracking_uri("runs/a")
    assert uri == f"sqlite:///{tmp_path.resolve()}/runs/a/mlflow.db"
    assert uri.startswith("sqlite:////")
    assert tracking.default_artifact_location(uri) == (tmp_path.resolve() / "runs/a/mlartifacts").as_uri()
    assert tracking.default_artifact_location("http://127.0.0.1:5000") is None


def test_open_experiment_creates_once_with_artifacts_beside_the_db(store_dir, store):
    client, exp_id = tracking.open_experiment(store, "exp")
    _, again = tracking.open_experiment(store, "exp")
    assert again == exp_id
    assert (store_dir / "mlflow.db").is_file()
    assert client.get_experiment(exp_id).artifact_location == (store_dir.resolve() / "mlartifacts").as_uri()


def test_run_params_parent_and_report_callback(tmp_path, store):
    from mlflow.tracking import MlflowClient

    parent = tracking.create_run(store, "exp", params={"search": "rank"}, run_name="search")
    run_id = tracking.create_run(store, "exp", params={"rank": 8, "lr": 2e-4, "target_modules": ["q", "v"], "artifact": None},
                                 run_name="trial", parent_run_id=parent)
    run = MlflowClient(store).get_run(run_id)
    assert run.data.params == {"rank": "8", "lr": "0.0002", "target_modules": "q,v", "artifact": "None"}
    assert run.data.tags[tracking.PARENT_TAG] == parent

    cb = pickle.loads(pickle.dumps(tracking.MlflowReportCallback(store, run_id)))  # it travels to the controller
    steps = [{"step": s, "train_loss": 1.0 / s, "lr": 0.1 * s} for s in (1, 2, 3)]
    cb.after_report(None, [{"step": 3, "train_loss": 0.6, "lr": 0.3, "step_metrics": steps}], None)
    cb.after_report(None, [{"step": 4, "train_loss": 0.25, "lr": 0.4, "eval_loss": 0.5, "eval_accuracy": 0.75,
                            "done": True, "step_metrics": [{"step": 4, "train_loss": 0.25, "lr": 0.4, "eval_loss": 0.5,
                                                            "eval_accuracy": 0.75, "done": True}]}], None)
    assert tracking.read_history(store, run_id, "train_loss") == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]
    assert [s for s, _ in tracking.read_history(store, run_id, "lr")] == [1, 2, 3, 4]
    assert tracking.read_history(store, run_id, "eval_accuracy") == [(4, 0.75)]
    assert tracking.read_history(store, run_id, "done") == []  # booleans are not metrics

    tracking.set_status(store, run_id, "FINISHED")
    assert MlflowClient(store).get_run(run_id).info.status == "FINISHED"


def test_unknown_parent_run_is_refused(store):
    with pytest.raises(tracking.TrackingError, match="parent run"):
        tracking.create_run(store, "exp", params={}, parent_run_id="0" * 32)


def test_unreachable_server_fails_fast_with_a_clear_message():
    uri = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    with pytest.raises(tracking.TrackingError, match="cannot open the MLflow tracking store") as e:
        tracking.open_experiment(uri, "exp")
    assert uri in str(e.value)
    assert time.monotonic() - t0 < 60  # no minutes of retries


@pytest.mark.parametrize("uri, match", [
    ("sqlite:////nonexistent-loraga/sub/mlflow.db", "does not exist"),
    ("file:///tmp/mlruns", "not one this tool supports"),
    ("", "empty"),
])
def test_bad_uris(uri, match):
    with pytest.raises(tracking.TrackingError, match=match):
        tracking.open_experiment(uri, "exp")


def test_log_init_artifact(tmp_path, store):
    from mlflow.tracking import MlflowClient

    from loraga_ray.core.artifact import InitArtifact

    g = torch.Generator().manual_seed(0)
    factors = {f"layer{i}": (torch.linalg.qr(torch.randn(8, 4, generator=g))[0], torch.tensor([4.0, 2.0, 1.0, 0.5]) / (i + 1),
                             torch.linalg.qr(torch.randn(6, 4, generator=g))[0]) for i in range(3)}
    meta = {"format": "loraga-ray-init", "format_version": 1, "k": 4, "max_rank": 2, "target_modules": list(factors),
            "shapes": {n: [8, 6] for n in factors}, "num_examples": 32, "num_targets": 32, "seed": 0,
            "svd": {"method": "exact"}, "workers": 2, "fingerprint": "ab" * 32, "base_model": "tiny",
            "timings": {"gradient_s": 1.5, "svd_s": 0.25}}
    InitArtifact(factors, meta).save(tmp_path / "art")
    run_id = tracking.create_run(store, "exp", params={"init": "lora-ga"})
    tracking.log_init_artifact(store, run_id, tmp_path / "art", tmp_path / "plots")
    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.data.params["init_num_examples"] == "32" and run.data.params["init_workers"] == "2"
    assert run.data.metrics["init_gradient_s"] == 1.5 and run.data.metrics["init_svd_s"] == 0.25
    names = {f.path for f in client.list_artifacts(run_id, "init")}
    assert names == {"init/meta.json", "init/singular_values.png"}
    assert (tmp_path / "plots" / "singular_values.png").read_bytes().startswith(PNG)


def test_plots_write_pngs(tmp_path):
    history = [{"step": s, "train_loss": 1 / s, "lr": 1e-3} for s in range(1, 11)]
    history[4].update(eval_loss=0.3, eval_accuracy=0.6)
    history[9].update(eval_loss=0.2, eval_accuracy=0.7)
    p = plot_loss_curve(history, tmp_path / "a" / "loss.png", title="t")
    assert Path(p).read_bytes().startswith(PNG)
    p = plot_singular_values({"a": [3.0, 2.0, 1.0], "b": [1.0, 0.5, 0.1]}, tmp_path / "sv.png")
    assert Path(p).read_bytes().startswith(PNG)
