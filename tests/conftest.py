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
    from loraga_ray.cluster import connect

    connect(None, num_cpus=8, num_gpus=2, quiet=True)
    yield ray
    ray.shutdown()
