"""The real thing: `ray start --head` on 127.0.0.1, `ray job submit` of pipelines/init_lora_ga.py,
wait for SUCCEEDED, check the artifact, stop the cluster, leave no process behind.

The cluster is separate from the session's `ray_session` fixture: its own temporary dir, free
ports, its own auth token, and an environment without the fixture's RAY_* variables; every
process it starts carries that token in its environment, which is how teardown finds them.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loraga_ray.core.artifact import InitArtifact
from test_distributed import reviews
from tiny import write_tiny_bert

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 420
PORT_FLAGS = ("port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
              "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli() -> str:
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.exists() else shutil.which("ray")


def _ours(marker: str) -> list[int]:
    """Pids of live processes whose environment holds ``marker`` (this cluster's token)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker.encode() in f.read():
                    pids.append(int(entry))
        except OSError:  # gone, or not ours to read
            pass
    return pids


class LocalCluster:
    """`ray start --head --block` in its own session; `stop()` ends it and everything it started."""

    def __init__(self, tmp: Path, num_cpus: int = 4):
        self.tmp = tmp
        self.token = secrets.token_hex(16)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(
            RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,  # the same for ray start and ray job
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # node IP 127.0.0.1: everything binds to loopback
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="2", RAY_USAGE_STATS_ENABLED="0",
            HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        )
        self.ports = {flag: _free_port() for flag in PORT_FLAGS}
        self.dashboard = f"http://127.0.0.1:{self.ports['dashboard-port']}"
        self.log = tmp / "ray-start.log"
        cmd = [_ray_cli(), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               "--include-dashboard=true", f"--temp-dir={tmp / 'ray'}", f"--num-cpus={num_cpus}", "--num-gpus=0",
               "--disable-usage-stats", *(f"--{flag}={port}" for flag, port in self.ports.items())]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while "Ray runtime started" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"ray start did not come up:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def ray(self, *args, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run([_ray_cli(), *args], env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    def stop(self) -> list[int]:
        """SIGTERM to the `ray start` session, SIGKILL to whatever of ours is left; returns the
        pids that needed the SIGKILL after the grace period."""
        with _suppress():
            os.killpg(self.proc.pid, signal.SIGTERM)
        with _suppress():
            self.proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _ours(self.token) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _ours(self.token)
        for pid in left:
            with _suppress():
                os.kill(pid, signal.SIGKILL)
        with _suppress():
            os.killpg(self.proc.pid, signal.SIGKILL)
        return left


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, kind, *exc):
        return kind is not None and issubclass(kind, (ProcessLookupError, PermissionError, subprocess.TimeoutExpired))


def test_ray_job_submit_init(tmp_path_factory):
    tmp = Path(tempfile.mkdtemp(prefix="lrjob-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    assets = tmp_path_factory.mktemp("job")
    model = write_tiny_bert(assets / "model")
    data = assets / "reviews.parquet"
    pq.write_table(pa.table(reviews(30, seed=7)), data)
    out = assets / "init"
    cluster = LocalCluster(tmp)
    try:
        sid = f"loraga-init-{secrets.token_hex(4)}"
        submit = cluster.ray(
            "job", "submit", "--address", cluster.dashboard, "--submission-id", sid, "--working-dir", str(ROOT), "--",
            sys.executable, "pipelines/init_lora_ga.py", "--model", str(model), "--data", str(data),
            "--init-samples", "16", "--batch-size", "4", "--max-rank", "2", "--max-length", "24", "--svd", "exact",
            "--workers", "1", "--out", str(out), "--no-progress",
            timeout=JOB_TIMEOUT_S,
        )
        status = cluster.ray("job", "status", "--address", cluster.dashboard, sid, timeout=60)
        assert submit.returncode == 0 and "SUCCEEDED" in status.stdout.upper(), (
            f"job {sid}: {status.stdout}\n--- submit output ---\n{submit.stdout[-4000:]}\n{submit.stderr[-2000:]}")
        assert "examples 16" in submit.stdout and "artifact -> " in submit.stdout  # the job's summary
        art = InitArtifact.load(out)
        assert art.meta["num_examples"] == 16 and art.meta["num_targets"] == 16
        assert art.meta["workers"] == 1 and art.meta["base_model"] == str(model)
        assert art.meta["dataset"] == str(data) and art.meta["k"] == 4
        assert all(art.factors[n][1].shape == (4,) for n in art.target_modules)
    finally:
        left = cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    assert _ours(cluster.token) == [], "processes of the test cluster survived SIGKILL"
    assert left == [] or all(not Path(f"/proc/{pid}").exists() for pid in left)
