"""`loraga-ray init` on Ray: equal to single-process estimate_init on the same sample, every
example counted once, faults and bad input, artifact storage."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from loraga_ray import estimate_init
from loraga_ray.core.artifact import META_FILE, ArtifactError, InitArtifact
from loraga_ray.jobs.cluster import ClusterError, check_reachable
from loraga_ray.data import Encoder, iter_batches, load_split, sample_table, table_fingerprint
from loraga_ray.jobs import init as init_job
from loraga_ray.jobs.gradient_worker import WorkerLostError, check_counts
from loraga_ray.jobs.init import run_init
from loraga_ray.jobs.init_data import SAMPLE_INDEX, read_pieces, read_units, token_dataset
from loraga_ray.options import InitOptions
from loraga_ray.models import load_model, load_tokenizer, resolve_model
from loraga_ray.core import storage

WORDS = "the a movie film plot actor great bad boring fun slow brilliant awful dull witty long short story".split()
NUM_ROWS = 40
MAX_RANK = 2
MAX_LENGTH = 24


def reviews(n: int, seed: int = 0) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 15)))) for _ in range(n)]
    return {"text": texts, "label": [int(x) for x in rng.integers(0, 2, size=n)]}


@pytest.fixture(scope="module")
def assets(tiny_bert_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model = tiny_bert_dir
    pq.write_table(pa.table(reviews(NUM_ROWS)), root / "reviews.parquet")
    return {"model": str(model), "data": str(root / "reviews.parquet"), "root": root}


def reference(model_dir: str, data: str, num_samples: int, batch_size: int, seed: int = 0, **columns):
    """Single-process estimate_init on the sample the pipeline must draw, and that sample."""
    spec = resolve_model(model_dir)
    model = load_model(spec, seed=seed)
    tokenizer = load_tokenizer(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sample = sample_table(load_split(data, **columns), num_samples, seed)
    encoder = Encoder(tokenizer, spec.task, MAX_LENGTH)
    batches = list(iter_batches(sample, encoder, batch_size, tokenizer.pad_token_id, spec.task))
    art = estimate_init(model, batches, max_rank=MAX_RANK, svd="exact", seed=seed)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    return art, sample, tokens


def options(assets, **kw) -> InitOptions:
    base = dict(model=assets["model"], data=assets["data"], num_samples=24, batch_size=4, max_rank=MAX_RANK,
                svd="exact", max_length=MAX_LENGTH, progress=False)
    base.update(kw)
    return InitOptions(**base)


def assert_same(art: InitArtifact, ref: InitArtifact) -> None:
    assert art.target_modules == ref.target_modules
    assert art.meta["fingerprint"] == ref.meta["fingerprint"]
    assert sorted(art.head or {}) == sorted(ref.head or {})  # the classifier head the gradient went through
    for name, t in (ref.head or {}).items():
        torch.testing.assert_close(art.head[name], t, rtol=0, atol=0)
    for name in ref.target_modules:
        U, S, V = art.factors[name]
        Ur, Sr, Vr = ref.factors[name]
        torch.testing.assert_close(S, Sr, rtol=1e-5, atol=1e-6 * float(Sr[0]))
        # the rank-k approximation is sign-free: compare it rather than the singular vectors
        G, Gr = U @ torch.diag(S) @ V.T, Ur @ torch.diag(Sr) @ Vr.T
        assert float((G - Gr).norm() / Gr.norm()) < 1e-4, name


@pytest.fixture(scope="module")
def ref24(assets):
    return reference(assets["model"], assets["data"], 24, 4)


def write_tiny_causal(root: Path) -> tuple[str, str]:
    """A 2-layer Llama with the demo SmolLM2 tokenizer, and arithmetic problems as JSON lines
    under other column names (q / a)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer("demo-smollm2")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    problems = load_split("demo-arithmetic").slice(0, 40)
    lines = [json.dumps({"q": q, "a": a}) for q, a in zip(problems["prompt"].to_pylist(), problems["response"].to_pylist())]
    (root / "arithmetic.jsonl").write_text("\n".join(lines) + "\n")
    return str(root / "llama"), str(root / "arithmetic.jsonl")


# workers, gpus_per_worker, case:
#   sample: 24 of 40 parquet rows, seq-cls (BERT); the session's logical GPUs (none is CUDA)
#   causal: 24 of 40 JSON lines with prompt/response under other names, causal-lm (Llama)
#   small:  10 JSON lines for 24 samples asked: a warning, every row used once, counts recorded
CASES = [(1, None, "sample"), (2, 1, "causal"), (3, 0, "small")]


@pytest.mark.parametrize("workers,gpus,case", CASES)
def test_equals_single_process(ray_session, assets, ref24, tmp_path, workers, gpus, case):
    """Each run equals single-process estimate_init on the same sample, to float32 rounding,
    and counts every sampled example exactly once."""
    kw = dict(workers=workers, gpus_per_worker=gpus, out=str(tmp_path / "init"))
    rows, n = NUM_ROWS - 2 * NUM_ROWS // 10, 24  # one file, train only: 10% validation and 10% test held out
    if case == "sample":
        ref, sample, tokens = ref24
    elif case == "causal":
        model, data = write_tiny_causal(assets["root"] / f"causal{workers}")
        columns = dict(prompt_column="q", response_column="a")
        ref, sample, tokens = reference(model, data, 24, 4, **columns)
        kw.update(model=model, data=data, **columns)
    else:
        data = tmp_path / "small.jsonl"
        small = reviews(10, seed=3)
        data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(small["text"], small["label"])))
        ref, sample, tokens = reference(assets["model"], str(data), 24, 4)
        kw.update(data=str(data))
        rows = n = 8  # 10 rows, 1 held out for validation, 1 for test
    opts = options(assets, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        art, summary = run_init(opts)
    assert any("only 8 rows" in str(w.message) for w in caught) == (case == "small")
    assert_same(art, ref)
    saved = InitArtifact.load(opts.out)
    assert_same(saved, ref)
    assert bool(saved.head) == (case != "causal") and (case == "causal" or saved.meta["head"]["seed"] == 0)
    meta = saved.meta  # what was written is what was returned
    assert meta["num_examples"] == ref.meta["num_examples"] == n
    assert meta["num_targets"] == ref.meta["num_targets"] > 0
    if case != "causal":
        assert meta["num_targets"] == n  # one target per classified example
    assert meta["num_tokens"] == tokens == summary["num_tokens"]
    assert meta["workers"] == workers and meta["base_model"] == opts.model
    assert meta["dataset"] == opts.data and meta["dataset_fingerprint"] == table_fingerprint(sample)
    assert meta["dataset_rows"] == rows and meta["num_samples_requested"] == 24
    assert summary["sample_too_small"] == (case == "small")
    assert sum(summary["examples_per_worker"]) == n and len(summary["examples_per_worker"]) == workers
    stages = ("read_s", "start_s", "gradient_s", "reduce_s", "svd_s", "write_s")
    assert all(summary[k] > 0 for k in stages)  # every stage ran and was timed
    assert summary["total_s"] >= sum(summary[k] for k in stages) - 0.01  # the stages add up to at most the total
    assert summary["bytes_moved"] == summary["sample_bytes"] + summary["reduce_bytes"] and summary["sample_bytes"] > 0
    assert summary["driver_peak_rss_mb"] > 100  # a process that imported torch: RSS in MiB, not KiB or bytes
    assert summary["tokens_per_s"] == pytest.approx(tokens / summary["gradient_s"], rel=0.01)
    assert summary["reduce_bytes"] == workers * sum(d_out * d_in * 4 for d_out, d_in in meta["shapes"].values())
    assert summary["retries"] == 0
    assert sorted(p.name for p in Path(opts.out).parent.iterdir() if p.name != "small.jsonl") == ["init"]  # no leftovers


def kill_a_worker_mid_stream(monkeypatch, tmp_path, after: int = 8, sig=None):
    """Fault injection from outside the code under test: the token stream is gated so that the
    rows from sample index ``after`` on wait until a release file exists; a thread waits for the
    gate to be reached (the workers have streamed the rows before it and are waiting inside
    ``consume``), SIGKILLs one gradient worker's process, then opens the gate. Returns the killed
    pids (filled in by the thread) and the thread."""
    import os
    import signal
    import threading
    import time

    from tiny import ray_processes_of_this_session

    sig = signal.SIGKILL if sig is None else sig
    release, reached = tmp_path / "release", tmp_path / "reached"

    def make_gate(release: str, reached: str, after: int):
        def gate(block):  # runs in a Ray Data task: only the standard library and pyarrow here
            import os as _os
            import time as _time

            if max(block.column(SAMPLE_INDEX).to_pylist()) >= after and not _os.path.exists(release):
                open(reached, "w").close()
                while not _os.path.exists(release):
                    _time.sleep(0.05)
            return block
        return gate

    gate = make_gate(str(release), str(reached), after)

    def gated_streams(sample, encoder, batch_size, workers):
        ds = token_dataset(sample, encoder, batch_size).map_batches(gate, batch_format="pyarrow", batch_size=None)
        return ds.streaming_split(workers, equal=False)

    def gated_shards(sample, encoder, batch_size, workers):
        return [None if ds is None else ds.map_batches(gate, batch_format="pyarrow", batch_size=None)
                for ds in real_shards(sample, encoder, batch_size, workers)]

    real_shards = init_job.token_shards
    monkeypatch.setattr(init_job, "token_streams", gated_streams)
    monkeypatch.setattr(init_job, "token_shards", gated_shards)
    killed: list[int] = []

    def killer():
        deadline = time.monotonic() + 120
        while not reached.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # the workers drain the rows before the gate
        for proc in ray_processes_of_this_session():
            if "GradientWorker" in " ".join(proc.cmdline()):
                os.kill(proc.pid, sig)
                killed.append(proc.pid)
                break
        release.write_text("")

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    return killed, thread


@pytest.mark.parametrize("strategy", ["replicated", "sharded"])
def test_killed_worker_is_redone(ray_session, assets, ref24, tmp_path, monkeypatch, strategy):
    """One of 2 workers SIGKILLed mid-stream (sharded: the other then waits in a collective for
    it): the stage reruns on fresh workers, every example is counted once, and the artifact equals
    the uninterrupted single-process estimate."""
    ref, _, _ = ref24
    out = tmp_path / "init"
    killed, thread = kill_a_worker_mid_stream(monkeypatch, tmp_path)
    art, summary = run_init(options(assets, workers=2, gpus_per_worker=0, out=str(out), init_strategy=strategy))
    thread.join(timeout=10)
    assert len(killed) == 1 and summary["retries"] == 1 and summary["strategy"] == strategy
    assert art.meta["num_examples"] == 24 and art.meta["num_targets"] == 24 and sum(summary["examples_per_worker"]) == 24
    assert_same(art, ref)
    assert InitArtifact.load(out).meta["num_examples"] == 24


@pytest.mark.parametrize("strategy,workers", [("replicated", 1), ("sharded", 2)])
def test_stuck_worker_is_treated_as_lost(ray_session, assets, ref24, tmp_path, monkeypatch, caplog, strategy, workers):
    """A worker alive but stuck (SIGSTOP from outside: it never finishes another batch; sharded,
    the other rank then blocks in a collective) counts as lost after --stall-timeout: within the
    timeout plus 30 s of the stop the stage is rerun on fresh workers, and the rerun gives the
    uninterrupted estimate."""
    import logging
    import os
    import signal

    ref, _, _ = ref24
    stopped, thread = kill_a_worker_mid_stream(monkeypatch, tmp_path, sig=signal.SIGSTOP)
    try:
        with caplog.at_level(logging.WARNING, logger="loraga_ray.jobs.init"):
            art, summary = run_init(options(assets, workers=workers, gpus_per_worker=0, out=str(tmp_path / "init"),
                                            stall_timeout=5, init_strategy=strategy))
    finally:
        for pid in stopped:  # the watchdog killed it; make sure nothing stays stopped
            with __import__("contextlib").suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    thread.join(timeout=10)
    assert len(stopped) == 1 and summary["retries"] == 1
    (rerun,) = [r for r in caplog.records if "finished no batch for 5s" in r.getMessage()]
    assert summary["strategy"] == strategy
    assert "running the gradient stage again" in rerun.getMessage()
    assert rerun.created - (tmp_path / "release").stat().st_mtime < 5 + 30  # release is written just after the stop
    assert_same(art, ref)


def test_killed_worker_without_retries_fails_clearly(ray_session, assets, tmp_path, monkeypatch):
    """One of 2 workers SIGKILLed mid-stream while the other still streams: a clear error, nothing written."""
    out = tmp_path / "run" / "init"
    out.parent.mkdir()
    killed, thread = kill_a_worker_mid_stream(monkeypatch, tmp_path)
    with pytest.raises(WorkerLostError, match=r"died mid-stream.*Gave up after 1 attempt.*no artifact was written"):
        run_init(options(assets, workers=2, gpus_per_worker=0, out=str(out), max_retries=0))
    thread.join(timeout=10)
    assert len(killed) == 1
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_count_check_refuses_a_wrong_total():
    ok = [{"examples": 2, "ids": np.array([0, 2])}, {"examples": 2, "ids": np.array([1, 3])}]
    check_counts(ok, 4)
    with pytest.raises(RuntimeError, match="1 never seen, 1 seen more than once"):
        check_counts([{"examples": 2, "ids": np.array([0, 2])}, {"examples": 2, "ids": np.array([2, 3])}], 4)
    with pytest.raises(RuntimeError, match="counted 3 examples for a sample of 4"):
        check_counts([{"examples": 3, "ids": np.array([0, 1, 2])}], 4)


def test_more_than_the_cluster_has(ray_session, assets):
    """The fixture's Ray has 8 CPUs and 2 (logical) GPUs and cannot grow: fail at once, with numbers."""
    with pytest.raises(ClusterError, match=r"3 workers x 1 GPU = 3 GPUs, the cluster has 2"):
        run_init(options(assets, workers=3, gpus_per_worker=1))
    with pytest.raises(ClusterError, match=r"the cluster has 8"):
        run_init(options(assets, workers=2, gpus_per_worker=0, cpus_per_worker=5))


def test_missing_column_names_the_columns(ray_session, assets, tmp_path):
    data = tmp_path / "renamed.jsonl"
    data.write_text('{"sentence": "a fine film", "polarity": 1}\n{"sentence": "dull", "polarity": 0}\n')
    with pytest.raises(ValueError, match=r"no column 'review'.*its columns are: sentence, polarity"):
        run_init(options(assets, data=str(data), text_column="review", label_column="polarity"))


def test_bad_options_fail_before_ray(assets):
    with pytest.raises(ValueError, match="--init-samples must be a positive integer, got 0"):
        run_init(options(assets, num_samples=0))
    with pytest.raises(ValueError, match="unknown --svd .fast.: use one of randomized, exact"):
        run_init(options(assets, svd="fast"))
    with pytest.raises(ValueError, match="neither a demo model"):
        run_init(options(assets, model=str(assets["root"] / "no-such-model")))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_address(assets, tmp_path):
    """Loopback only: a closed port answers at once; the CLI reports it and exits 1, no artifact."""
    port = _closed_port()
    with pytest.raises(ClusterError, match="cannot reach the Ray cluster"):
        check_reachable(f"127.0.0.1:{port}", timeout=5)
    out = tmp_path / "init"
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "loraga_ray.cli", "init", "--model", assets["model"], "--data", assets["data"],
         "--out", str(out), "--address", f"127.0.0.1:{port}", "--no-progress"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"cannot reach the Ray cluster at '127.0.0.1:{port}'" in proc.stderr
    assert not out.exists()


def test_local_units_follow_load_split(tmp_path):
    """A folder of split-named shards is read piece by piece in load_split's order."""
    folder = tmp_path / "shards"
    folder.mkdir()
    rows = reviews(9, seed=5)
    for i, sl in enumerate([slice(0, 4), slice(4, 9)]):
        pq.write_table(pa.table({k: v[sl] for k, v in rows.items()}), folder / f"train-0000{i}-of-00002.parquet")
    pq.write_table(pa.table(reviews(3, seed=6)), folder / "test.parquet")
    (folder / "validation").mkdir()  # a split's subfolder, its files named after the split too
    pq.write_table(pa.table(reviews(2, seed=7)), folder / "validation" / "validation-00000-of-00001.parquet")
    for split, names in [("train", ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]),
                         ("test", ["test.parquet"]), ("validation", ["validation"])]:
        units = read_units(str(folder), split)
        assert [Path(u).name for u, _ in units] == names
        batch = pa.table({"source": [u for u, _ in units], "split": [s for _, s in units]})
        assert read_pieces(batch, "seq-cls", {}).equals(load_split(str(folder), split))
    assert read_units(str(folder), "dev") == read_units(str(folder), "validation")  # an alias
    with pytest.raises(ValueError, match="no 'holdout' split"):
        read_units(str(folder), "holdout")


# ------------------------------------------------------------------ storage


def _artifact(tmp_path) -> InitArtifact:
    from loraga_ray.core.estimate import estimate_init
    from tiny import batches, make_examples, tiny_bert

    return estimate_init(tiny_bert(), batches(make_examples(8, "seq-cls"), 4, "seq-cls"), max_rank=2, svd="exact")


def test_storage_remote_round_trip_and_interrupted_upload(tmp_path, monkeypatch):
    """Through a pyarrow filesystem (as for s3:// / gs://): meta.json lands last, so an interrupted
    upload (even over an existing artifact) leaves a prefix that is not an artifact."""
    import pyarrow.fs

    bucket = tmp_path / "bucket"
    bucket.mkdir()
    fs = pyarrow.fs.SubTreeFileSystem(str(bucket), pyarrow.fs.LocalFileSystem())
    art = _artifact(tmp_path)
    storage.save_artifact(art, "runs/init", filesystem=fs)
    back = storage.load_artifact("runs/init", filesystem=fs)
    assert back.meta == art.meta
    for name in art.target_modules:
        torch.testing.assert_close(back.factors[name][1], art.factors[name][1])
    assert art.head and back.head.keys() == art.head.keys()  # the classifier head travels too
    for name in art.head:
        torch.testing.assert_close(back.head[name], art.head[name], rtol=0, atol=0)

    uploads = []

    def failing_upload(local, fs_, path):
        uploads.append(path)
        if path.endswith(META_FILE):
            raise OSError("network went away")
        return real_upload(local, fs_, path)

    real_upload = storage._upload_file
    monkeypatch.setattr(storage, "_upload_file", failing_upload)
    with pytest.raises(OSError, match="network went away"):
        storage.save_artifact(art, "runs/init", filesystem=fs, overwrite=True)
    assert uploads[-1].endswith(META_FILE) and len(uploads) == 3  # factors and head first, meta last
    with pytest.raises(ArtifactError, match="not an init artifact"):
        storage.load_artifact("runs/init", filesystem=fs)


def test_storage_local_save_is_atomic(tmp_path, monkeypatch):
    import loraga_ray.core.artifact as artifact_module

    art = _artifact(tmp_path)
    assert storage.save_artifact(art, f"file://{tmp_path}/a") == str(tmp_path / "a")
    assert storage.load_artifact(str(tmp_path / "a")).meta == art.meta

    def broken_save_file(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact_module, "save_file", broken_save_file)
    with pytest.raises(KeyboardInterrupt):
        storage.save_artifact(art, str(tmp_path / "b"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_embedded_ray_quiets_train_internals(monkeypatch):
    """The embedded instance's workers run a setup hook that keeps Ray Train's per-report INFO line
    and the no-dashboard state-API warning out of the progress output; a cluster connection and a
    user's own hook are left alone."""
    import importlib
    import logging

    import ray

    from loraga_ray.jobs import cluster

    seen = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append(kw))
    cluster.connect(None, num_cpus=2, runtime_env={"env_vars": {"A": "1"}})
    assert seen[-1]["runtime_env"] == {"env_vars": {"A": "1"}, "worker_process_setup_hook": cluster.QUIET_HOOK}
    assert seen[-1]["include_dashboard"] is False and seen[-1]["dashboard_host"] == "127.0.0.1"
    cluster.connect(None, runtime_env={"worker_process_setup_hook": "mine.hook"})
    assert seen[-1]["runtime_env"]["worker_process_setup_hook"] == "mine.hook"

    module, _, name = cluster.QUIET_HOOK.rpartition(".")
    hook = getattr(importlib.import_module(module), name)  # what a worker resolves from the string
    from ray.train.v2._internal.execution import context

    hook()
    assert logging.getLogger(context.__file__).getEffectiveLevel() == logging.WARNING
    cleaner = logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner")
    assert cleaner.getEffectiveLevel() == logging.ERROR


def test_lost_objects_are_retried_like_lost_workers(ray_session, assets, ref24, tmp_path, monkeypatch):
    """A worker's partial sums lost with their owner (ObjectLostError / OwnerDiedError) while the
    driver reduces them: the stage reruns like after a lost worker (0.1.0 failed the run)."""
    from ray.exceptions import ObjectLostError

    ref, _, _ = ref24
    real = init_job.reduce_and_factorize
    calls = []

    def lose_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ObjectLostError("ab" * 14, "", "")  # the object store lost a worker's partial sums
        return real(*args, **kwargs)

    monkeypatch.setattr(init_job, "reduce_and_factorize", lose_once)
    art, summary = run_init(options(assets, workers=1, gpus_per_worker=0, out=str(tmp_path / "init")))
    assert len(calls) == 2 and summary["retries"] == 1
    assert_same(art, ref)


def broken_copy_seen_whole_by_the_driver(model_dir: str, tmp_path, monkeypatch) -> Path:
    """A copy of the model whose weights file is truncated, with the driver's own weight check
    switched off in this process: as if the driver's node had a good copy and a worker's node
    a damaged one. Returns the copy's folder."""
    import shutil

    import loraga_ray.models as models

    broken = tmp_path / "broken-model"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    monkeypatch.setattr(models, "check_weights", lambda folder, allow_pickle=False: None)
    return broken


def test_model_broken_only_on_a_worker_node(ray_session, assets, tmp_path, monkeypatch):
    """The driver sees good weights, the gradient workers a truncated file: a clear error naming
    the file (raised in the worker, given back as itself), no artifact, and the CLI's one line."""
    from loraga_ray.jobs.cluster import error_message
    from loraga_ray.models import ModelLoadError

    broken = broken_copy_seen_whole_by_the_driver(assets["model"], tmp_path, monkeypatch)
    out = tmp_path / "init"
    with pytest.raises(ModelLoadError, match=r"broken-model/model.safetensors is damaged or truncated") as info:
        run_init(options(assets, model=str(broken), workers=2, gpus_per_worker=0, out=str(out)))
    assert not out.exists()
    line = error_message(info.value)
    assert "model.safetensors is damaged or truncated" in line and "Traceback" not in line


def test_embedded_ray_never_joins_a_head_started_on_this_machine(monkeypatch):
    """No --address / RAY_ADDRESS: a new local instance (address="local"), even when `ray start
    --head` runs here; plain ray.init() would join that head and then refuse num_cpus."""
    import ray

    from loraga_ray.jobs.cluster import connect

    seen = {}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    connect(None, min_cpus=8)
    assert seen["address"] == "local" and seen["num_cpus"] >= 8 and seen["dashboard_host"] == "127.0.0.1"
