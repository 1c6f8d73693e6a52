"""`loraga-ray tune`: bad input fails before any work; a 2-trial search on a tiny model shares
one gradient estimate, records MLflow parent + children, writes its results and resumes."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
from pathlib import Path

import pytest

from loraga_ray import cli
from loraga_ray.jobs.cluster import ClusterError
from loraga_ray.spaces import load_space
from loraga_ray.spaces import SpaceError
from loraga_ray.tracking import TrackingError
from loraga_ray.options import TrainOptions
from loraga_ray.jobs.search import SearchError, SearchOptions, count_estimates, plan_search, search

@pytest.fixture(scope="module", autouse=True)
def quick_controller():
    """Ray Train's controller polls its workers every 2 s by default; these runs are a few steps.
    The search hands RAY_TRAIN_* variables on to its trials, and Train to its controller."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
        yield


# ---------------------------------------------------------------------------------------------
# fixtures: a tiny BERT classifier with the demo MiniLM tokenizer, a small labelled dataset
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tiny_bert_dir) -> Path:
    return Path(tiny_bert_dir)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("tiny-data")
    rng = random.Random(0)
    words = {1: ["great", "wonderful", "moving", "fun"], 0: ["dull", "awful", "boring", "weak"]}
    for split, n in (("train", 64), ("validation", 16)):
        rows = [{"text": f"a {rng.choice(words[i % 2])} film", "label": i % 2} for i in range(n)]
        (dest / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dest


def write_space(folder: Path, text: str) -> Path:
    path = folder / "space.yaml"
    path.write_text(text)
    return path


def base_options(model: Path, data: Path, out: Path, **kw) -> TrainOptions:
    values = dict(model=str(model), data=str(data), out=str(out), max_steps=4, eval_every=2, batch_size=8,
                  init_samples=16, init_batch_size=8, max_length=32, warmup_ratio=0.0, device="cpu")
    values.update(kw)
    return TrainOptions(**values)


@pytest.fixture(scope="module")
def small_artifact(tiny_model, tmp_path_factory) -> Path:
    """An artifact of the tiny model with max_rank 2 (estimated in-process on random tokens)."""
    from loraga_ray.core.estimate import estimate_init
    from loraga_ray.models import load_model
    from tiny import batches, make_examples

    model = load_model(str(tiny_model), task="seq-cls")
    art = estimate_init(model, batches(make_examples(16, "seq-cls"), 8, "seq-cls"), max_rank=2, base_model=str(tiny_model))
    return art.save(tmp_path_factory.mktemp("artifact") / "init")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# bad input: a clear error, nothing started, nothing written
# ---------------------------------------------------------------------------------------------


def test_unknown_key_from_the_command_line(tiny_model, tiny_data, tmp_path, capsys):
    space = write_space(tmp_path, "rank: {grid: [2, 4]}\nlearning_rate: {loguniform: [1.0e-5, 1.0e-3]}\n")
    out = tmp_path / "out"
    rc = cli.main(["tune", "--model", str(tiny_model), "--data", str(tiny_data), "--space", str(space), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "unknown key 'learning_rate'" in err and str(space) in err
    assert not out.exists()


def test_rank_the_model_cannot_take(tiny_model, tiny_data, tmp_path):
    # hidden size 32: LoRA-GA needs 2r <= 32
    space = write_space(tmp_path, "rank: {grid: [4, 32]}\n")
    out = tmp_path / "out"
    with pytest.raises(SearchError, match=r"key 'rank': 32 is too large: LoRA-GA uses 2r = 64 .* = 16"):
        search(base_options(tiny_model, tiny_data, out), SearchOptions(space=str(space)))
    # plain LoRA takes r <= 32 but not 64
    space = write_space(tmp_path, "rank: {grid: [32, 64]}\ninit: lora\n")
    with pytest.raises(SearchError, match=r"key 'rank': 64 is too large"):
        search(base_options(tiny_model, tiny_data, out), SearchOptions(space=str(space)))
    assert not out.exists()


def test_rank_above_the_artifact(tiny_model, tiny_data, small_artifact, tmp_path):
    out = tmp_path / "out"
    space = write_space(tmp_path, "rank: {grid: [2, 4]}\nlr: {loguniform: [1.0e-4, 1.0e-3]}\n")
    with pytest.raises(SearchError, match=r"key 'rank': 4 is above what the artifact .* rank <= 2"):
        search(base_options(tiny_model, tiny_data, out, artifact=str(small_artifact)), SearchOptions(space=str(space)))
    assert not out.exists()
    # a space within the artifact passes every check (shapes and the weight fingerprint)
    ok = load_space(write_space(tmp_path, "rank: {grid: [1, 2]}\n"))
    plan, max_rank, artifact = plan_search(base_options(tiny_model, tiny_data, out, artifact=str(small_artifact)), ok)
    assert max_rank == 2 and plan.task == "seq-cls" and artifact.max_rank == 2


def test_tracking_uri_that_cannot_be_opened(tiny_model, tiny_data, tmp_path):
    space = write_space(tmp_path, "rank: {grid: [2, 4]}\n")
    out = tmp_path / "out"
    missing = f"sqlite:///{tmp_path}/no/such/folder/mlflow.db"
    with pytest.raises(TrackingError, match="does not exist"):
        search(base_options(tiny_model, tiny_data, out, tracking_uri=missing), SearchOptions(space=str(space)))
    server = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(TrackingError, match="cannot open the MLflow tracking store"):
        search(base_options(tiny_model, tiny_data, out, tracking_uri=server), SearchOptions(space=str(space)))
    assert not out.exists()


def test_workers_beyond_the_cluster(ray_session, tiny_model, tiny_data, tmp_path):
    space = write_space(tmp_path, "rank: {grid: [2, 4]}\n")
    out = tmp_path / "out"
    with pytest.raises(ClusterError, match=r"Train workers ask for more .* 16 workers x 1 CPU = 16 CPUs plus 1 for Ray Data, the cluster has 8"):
        search(base_options(tiny_model, tiny_data, out, workers=16, batch_size=16), SearchOptions(space=str(space)))
    # each trial fits, but 8 at once would hold all 8 CPUs and starve their data pipelines
    with pytest.raises(SearchError, match=r"--max-concurrent 8 trials .* needs 9 CPUs but the Ray cluster has 8"):
        search(base_options(tiny_model, tiny_data, out), SearchOptions(space=str(space), max_concurrent=8))
    assert not out.exists()


def test_other_mistakes(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SearchError, match="holds no search"):
        search(None, SearchOptions(resume=True), out=out)
    with pytest.raises(SpaceError, match="not a file"):
        search(base_options(tiny_model, tiny_data, out), SearchOptions(space=str(tmp_path / "nope.yaml")))
    space = write_space(tmp_path, "rank: {grid: [2, 4]}\n")
    with pytest.raises(SearchError, match="grace-period 8 is longer than --max-steps 4"):
        search(base_options(tiny_model, tiny_data, out), SearchOptions(space=str(space), grace_period=8))
    space = write_space(tmp_path, "batch_size: {choice: [8, 9]}\n")
    with pytest.raises(SearchError, match="key 'batch_size': 9 is not a multiple of --workers 2"):
        search(base_options(tiny_model, tiny_data, out, workers=2), SearchOptions(space=str(space)))
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# a real search: 2 trials, interrupted after the first, resumed, resumed again when finished
# ---------------------------------------------------------------------------------------------


def interrupt_once(marker: Path):
    """A Tune callback that presses Ctrl+C (SIGINT to the driver) when the first trial completes.
    Tune restores callbacks on resume, so a marker file makes it fire only once."""
    from ray import tune

    class Interrupt(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            if not marker.exists():
                marker.write_text(trial.trial_id)
                os.kill(os.getpid(), signal.SIGINT)

    return Interrupt()


@pytest.mark.parametrize("runner", ["auto", "ray-train"])  # auto: in-process trials (one CPU worker)
def test_search_one_estimate_mlflow_results_resume(ray_session, tiny_model, tiny_data, tmp_path, monkeypatch, runner):
    from mlflow.tracking import MlflowClient

    from loraga_ray.jobs import init as init_job

    calls = []
    real_run_init = init_job.run_init

    def counting_run_init(opts):
        calls.append(opts.max_rank)
        return real_run_init(opts)

    monkeypatch.setattr(init_job, "run_init", counting_run_init)

    out = tmp_path / "search"
    space = write_space(tmp_path, "# two ranks, one lr\nrank: {grid: [2, 4]}\nlr: 1.0e-3\n")
    base = base_options(tiny_model, tiny_data, out)
    marker = tmp_path / "interrupted"
    first = search(base, SearchOptions(space=str(space), max_concurrent=1, grace_period=4, trial_runner=runner),
                   callbacks=[interrupt_once(marker)])
    assert marker.exists() and first.interrupted
    assert [r["status"] for r in first.rows].count("completed") == 1
    assert calls == [4]  # one estimate, for the largest rank of the space

    second = search(None, SearchOptions(resume=True), out=out)
    assert not second.interrupted
    assert sorted(r["rank"] for r in second.rows) == [2, 4]
    assert all(r["status"] == "completed" and r["steps"] == 4 for r in second.rows), second.rows

    # ---- one gradient estimate per search, applied by every trial
    assert calls == [4] and count_estimates(out) == 1 and second.gradient_estimates == 1
    assert len((out / "estimates.jsonl").read_text().splitlines()) == 1
    artifact = str(out / "init")
    assert second.artifact == artifact and json.loads((out / "init" / "meta.json").read_text())["max_rank"] == 4
    for row in second.rows:
        trial = out / "trials" / row["trial_id"]
        assert json.loads((trial / "mlflow_run.json").read_text())["artifact"] == artifact
        assert (trial / "adapter" / "adapter_config.json").is_file()

    # ---- MLflow: a parent run with the init logged once, two children with per-step metrics
    client = MlflowClient(tracking_uri=second.tracking_uri)
    assert second.tracking_uri == "sqlite:///" + str(out / "mlflow.db")
    parent = client.get_run(second.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["model"] == str(tiny_model) and parent.data.params["data"] == str(tiny_data)
    assert json.loads(parent.data.params["space.rank"]) == {"grid": [2, 4]}
    assert parent.data.params["init_k"] == "8" and parent.data.params["init_num_examples"] == "16"
    assert "init_gradient_s" in parent.data.metrics and "init_svd_s" in parent.data.metrics
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "init")].count("init/meta.json") == 1
    assert parent.data.metrics["best_eval_loss"] == pytest.approx(second.best["eval_loss"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2
    by_rank = {c.data.params["rank"]: c for c in children}
    assert sorted(by_rank) == ["2", "4"]
    rows = {str(r["rank"]): r for r in second.rows}
    for rank, child in by_rank.items():
        assert child.info.status == "FINISHED"
        assert child.data.params["artifact"] == artifact and child.data.params["lr"] == "0.001"
        assert child.data.params["init"] == "lora-ga" and child.info.run_name == rows[rank]["trial_id"]
        train_loss = client.get_metric_history(child.info.run_id, "train_loss")
        assert sorted(m.step for m in train_loss) == [1, 2, 3, 4]
        eval_loss = sorted((m.step, m.value) for m in client.get_metric_history(child.info.run_id, "eval_loss"))
        assert [s for s, _ in eval_loss] == [2, 4]
        assert eval_loss[-1][1] == pytest.approx(rows[rank]["eval_loss"], rel=1e-6)
        assert "init_gradient_s" not in child.data.metrics  # the estimate is logged on the parent only
        assert {a.path for a in client.list_artifacts(child.info.run_id)} >= {"adapter", "metrics.json"}

    # ---- results: table, best config, plot
    table = (out / "trials.csv").read_text().splitlines()
    assert len(table) == 3 and table[0].startswith("trial_id,status,rank,lr,init,eval_loss,eval_accuracy")
    assert (out / "trials.md").read_text().count("| completed |") == 2
    best = json.loads((out / "best.json").read_text())
    assert best["eval_loss"] == pytest.approx(min(r["eval_loss"] for r in second.rows))
    assert best["config"]["rank"] in (2, 4) and best["config"]["lr"] == pytest.approx(1e-3)
    assert (out / "eval_loss.png").stat().st_size > 1000

    # ---- resuming a finished search runs nothing and estimates nothing
    trial_ids = sorted(r["trial_id"] for r in second.rows)
    rc = cli.main(["tune", "--out", str(out), "--resume"])
    assert rc == 0
    assert calls == [4] and count_estimates(out) == 1
    assert sorted(line.split(",")[0] for line in (out / "trials.csv").read_text().splitlines()[1:]) == trial_ids
    assert len(client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")) == 2


# ---------------------------------------------------------------------------------------------
# trials in the Tune trial's own process (--trial-runner): the same run as a Ray Train trial
# ---------------------------------------------------------------------------------------------


def _trial_results(res) -> dict:
    """{rank: (history, adapter tensors)} of a search's completed trials."""
    from safetensors.torch import load_file

    found = {}
    for row in res.rows:
        trial = res.out / "trials" / row["trial_id"]
        history = json.loads((trial / "metrics.json").read_text())["history"]
        found[row["rank"]] = (history, load_file(str(trial / "adapter" / "adapter_model.safetensors")), row["trial_id"])
    return found


def test_in_process_trials_are_the_ray_train_trials(ray_session, tiny_model, tiny_data, small_artifact, tmp_path):
    """The same space searched with each trial a Ray Train run and with each trial training in
    its Tune trial's process (the default for one CPU worker): the same per-step losses, eval
    metrics and exported adapters (float32, one thread: to 1e-6), each checkpoint in the trial's
    storage, Tune's results and MLflow's per-step metrics alike."""
    from mlflow.tracking import MlflowClient

    space = write_space(tmp_path, "rank: {grid: [1, 2]}\nlr: 1.0e-3\n")
    runs = {}
    for runner in ("ray-train", "auto"):
        base = base_options(tiny_model, tiny_data, tmp_path / runner, init="lora-ga", artifact=str(small_artifact),
                            max_steps=4, eval_every=2)
        res = search(base, SearchOptions(space=str(space), max_concurrent=1, grace_period=4, trial_runner=runner))
        assert not res.interrupted and all(r["status"] == "completed" and r["steps"] == 4 for r in res.rows), res.rows
        runs[runner] = (res, _trial_results(res))
    (train_res, train), (local_res, local) = runs["ray-train"], runs["auto"]
    assert sorted(train) == sorted(local) == [1, 2]
    for rank in (1, 2):
        (h_train, a_train, id_train), (h_local, a_local, id_local) = train[rank], local[rank]
        assert [h["step"] for h in h_local] == [1, 2, 3, 4]
        for a, b in zip(h_train, h_local):
            for key in ("train_loss", "grad_norm", "lr", "eval_loss", "eval_accuracy"):
                assert (key in a) == (key in b)
                if key in a:
                    assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (rank, a["step"], key)
        assert a_train.keys() == a_local.keys() and a_local
        assert max(float((a_train[k] - a_local[k]).abs().max()) for k in a_train) <= 1e-6
        # where the checkpoints are: Ray Train's run folder, or this runner's numbered ones
        local_ckpts = sorted(p.name for p in (local_res.out / "train" / id_local).glob("checkpoint_*"))
        assert local_ckpts == ["checkpoint_00000002", "checkpoint_00000004"]
        assert not list((train_res.out / "train" / id_train).glob("**/checkpoint_0000000*"))
        assert list((train_res.out / "train" / id_train).glob("**/checkpoint_*"))
        # Tune saw the same eval_loss; MLflow holds each step once
        rows = {r["rank"]: r for r in local_res.rows}
        assert rows[rank]["eval_loss"] == pytest.approx(h_train[-1]["eval_loss"], rel=1e-6)
    client = MlflowClient(tracking_uri=local_res.tracking_uri)
    children = client.search_runs([client.get_run(local_res.parent_run_id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{local_res.parent_run_id}'")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    for child in children:
        assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "train_loss")) == [1, 2, 3, 4]
    # auto is saved as what it picked: a resumed search keeps its trials' runner (and their checkpoints)
    assert json.loads((local_res.out / "search.json").read_text())["search"]["trial_runner"] == "in-process"
    assert json.loads((train_res.out / "search.json").read_text())["search"]["trial_runner"] == "ray-train"


def test_in_process_trial_killed_from_outside_resumes_from_its_checkpoint(ray_session, tiny_model, tiny_data,
                                                                          small_artifact, tmp_path):
    """The process of an in-process trial SIGKILLed (from outside, once the trial has a
    checkpoint): with --max-failures 1 Tune restarts the trial, which resumes from its last
    checkpoint and ends with the adapter of an uninterrupted trial (max abs diff <= 1e-6); MLflow
    holds each step once."""
    import threading
    import time

    from mlflow.tracking import MlflowClient

    from tiny import ray_processes_of_this_session

    space = write_space(tmp_path, "rank: 2\nlr: 1.0e-3\n")
    common = dict(init="lora-ga", artifact=str(small_artifact), max_steps=40, eval_every=20, checkpoint_every=4,
                  max_failures=1)
    plain = search(base_options(tiny_model, tiny_data, tmp_path / "plain", **common),
                   SearchOptions(space=str(space), grace_period=40))
    out = tmp_path / "killed"
    killed = []

    def kill_after_a_checkpoint():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list((out / "train").glob("*/checkpoint_00000008")):
            time.sleep(0.02)
        for proc in ray_processes_of_this_session():
            if "ImplicitFunc" in " ".join(proc.cmdline()) or "run_trial" in " ".join(proc.cmdline()):
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(proc.pid)
                return

    thread = threading.Thread(target=kill_after_a_checkpoint, daemon=True)
    thread.start()
    res = search(base_options(tiny_model, tiny_data, out, **common), SearchOptions(space=str(space), grace_period=40))
    thread.join(timeout=10)
    assert len(killed) == 1, "no trial process was found to kill"
    assert not res.interrupted and res.rows[0]["status"] == "completed" and res.rows[0]["steps"] == 40
    (h_plain, a_plain, _), = _trial_results(plain).values()
    (h_kill, a_kill, trial_id), = _trial_results(res).values()
    assert max(float((a_plain[k] - a_kill[k]).abs().max()) for k in a_plain) <= 1e-6
    assert [h["step"] for h in h_kill] == list(range(1, 41))
    # it resumed (the training clock starts again at the resumed step), not started over: a rerun
    # from step 0 would give the same numbers
    clock = [h["elapsed_s"] for h in h_kill]
    restarts = [h_kill[i]["step"] for i in range(1, 40) if clock[i] < clock[i - 1]]
    assert len(restarts) == 1 and restarts[0] > 8, clock
    assert h_kill[-1]["eval_loss"] == pytest.approx(h_plain[-1]["eval_loss"], abs=1e-6)
    run_id = json.loads((out / "trials" / trial_id / "mlflow_run.json").read_text())["mlflow_run_id"]
    steps = sorted(m.step for m in MlflowClient(tracking_uri=res.tracking_uri).get_metric_history(run_id, "train_loss"))
    assert steps == list(range(1, 41))
    assert not list((out / "train" / trial_id).glob(".checkpoint_*"))  # the lost process's unfinished copy is gone


def test_trial_runner_mistakes(tiny_model, tiny_data, tmp_path):
    space = write_space(tmp_path, "lr: 1.0e-3\n")
    base = base_options(tiny_model, tiny_data, tmp_path / "s", init="lora", workers=2, batch_size=8)
    with pytest.raises(SearchError, match=r"--trial-runner in-process .* --workers is 2"):
        search(base, SearchOptions(space=str(space), trial_runner="in-process"))
    with pytest.raises(SearchError, match=r"--trial-runner must be one of auto, ray-train, in-process"):
        search(base, SearchOptions(space=str(space), trial_runner="threads"))
    assert not (tmp_path / "s").exists()


def test_a_trial_stopped_inside_its_report_keeps_its_checkpoint_and_metrics(tmp_path):
    """Tune stops a trial (ASHA) by raising SystemExit inside ``tune.report``: the in-process
    session's callbacks before it (MLflow) still got the report, and the report's checkpoint is
    committed whole (no unfinished copy is left)."""
    from loraga_ray.training.local import LocalSession

    got = []

    class Record:
        def after_report(self, run_context, metrics, checkpoint):
            got.append((metrics[0]["step"], checkpoint.path if checkpoint else None))

    class Stop:
        def after_report(self, run_context, metrics, checkpoint):
            raise SystemExit(0)

    made = tmp_path / "made"
    made.mkdir()
    (made / "state.json").write_text("{}")
    session = LocalSession({}, tmp_path / "trial", callbacks=[Record(), Stop()])
    with pytest.raises(SystemExit):
        session.report({"step": 6, "eval_loss": 0.5}, made)
    dest = tmp_path / "trial" / "checkpoint_00000006"
    assert got == [(6, str(dest))] and (dest / "state.json").is_file()
    assert sorted(p.name for p in (tmp_path / "trial").iterdir()) == ["checkpoint_00000006"]
    assert session.checkpoint().path == str(dest)
    assert LocalSession({}, tmp_path / "trial").checkpoint().path == str(dest)  # a restart resumes from it
