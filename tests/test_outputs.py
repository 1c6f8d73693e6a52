"""Nothing lost: outputs never replace what loraga-ray did not write, replacing our own needs
--overwrite and keeps the old one until the new one is complete, one writer per output; init
artifacts are checked on load (checksum, JSON, keys, version, NaN/Inf, shapes); version-1
artifacts still load. Each case failed (or silently lost data) with 0.1.0's code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraga_ray import InitArtifact, apply_lora_ga, estimate_init, save_adapter, save_merged
from loraga_ray.core import files, storage
from loraga_ray.core.artifact import FACTORS_FILE, META_FILE, ArtifactError
from loraga_ray.core.files import OutputError, atomic_folder, output_lock
from tiny import batches, make_examples, tiny_bert, tiny_llama


@pytest.fixture(scope="module")
def artifact():
    task = "causal-lm"
    return estimate_init(tiny_llama(), batches(make_examples(8, task), 4, task), max_rank=2, svd="exact")


def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my own work")
    return path


# ------------------------------------------------------------------------- never destroy


def test_a_users_folder_is_refused_and_untouched(artifact, tmp_path):
    """0.1.0's atomic_folder moved whatever was at the destination aside and deleted it."""
    for save in (lambda p: artifact.save(p), lambda p: storage.save_artifact(artifact, str(p))):
        dest = _user_folder(tmp_path / f"mine{len(list(tmp_path.iterdir()))}")
        with pytest.raises(OutputError, match="files loraga-ray did not write.*nothing in it was touched"):
            save(dest)
        assert sorted(p.name for p in dest.iterdir()) == ["notes.txt"] and (dest / "notes.txt").read_text() == "my own work"
    model = apply_lora_ga(tiny_llama(), artifact, rank=2, alpha=4)
    dest = _user_folder(tmp_path / "adapter")
    with pytest.raises(OutputError, match="files loraga-ray did not write"):
        save_adapter(model, dest)
    with pytest.raises(OutputError, match="files loraga-ray did not write"):
        save_merged(model, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["notes.txt"]
    assert hasattr(model, "peft_config")  # save_merged checked before merging anything
    # another of our own kinds is not replaced either
    with pytest.raises(OutputError, match="holds a loraga-ray init artifact, not a loraga-ray adapter"):
        save_adapter(model, artifact.save(tmp_path / "art"))


def test_replacing_our_own_output_needs_overwrite(artifact, tmp_path):
    dest = artifact.save(tmp_path / "init")
    first = (dest / META_FILE).read_text()
    with pytest.raises(OutputError, match="already holds a loraga-ray init artifact. Pass --overwrite"):
        artifact.save(dest)
    assert (dest / META_FILE).read_text() == first
    artifact.meta["seed"] = 7
    artifact.save(dest, overwrite=True)
    assert InitArtifact.load(dest).meta["seed"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init"]  # no temporary or old copies left
    empty = tmp_path / "empty"
    empty.mkdir()
    artifact.save(empty)  # an empty folder holds nothing to lose
    assert InitArtifact.load(empty).meta["seed"] == 7


@pytest.mark.parametrize("swap", [True, False])
def test_a_killed_replace_never_loses_both(artifact, tmp_path, monkeypatch, swap):
    """The old output stays until the new one is complete. Without a one-step swap, a write
    killed between its two renames leaves the old output aside: the next write puts it back.
    The kill is simulated by failing the second rename (SIGKILL would stop at the same point)."""
    dest = artifact.save(tmp_path / "init")
    old_meta = (dest / META_FILE).read_text()
    if not swap:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    real_rename = Path.rename

    def killed_rename(self, target):
        if Path(target) == dest and ".tmp-" in self.name:
            raise KeyboardInterrupt("killed")  # after the old one moved aside (no swap) / instead of the swap
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_rename)
    if swap:
        monkeypatch.setattr(files, "_exchange", lambda a, b: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        artifact.save(dest, overwrite=True)
    monkeypatch.undo()
    on_disk = sorted(p.name for p in tmp_path.iterdir())
    if swap:
        assert on_disk == ["init"] and (dest / META_FILE).read_text() == old_meta  # untouched
    else:
        assert not dest.exists() and any(n.startswith(".init.old-") for n in on_disk)  # the old one, aside
        files.recover(dest)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["init"] and (dest / META_FILE).read_text() == old_meta
    # leftovers of a killed write are recognised and cleaned by the next write
    (tmp_path / ".init.tmp-dead").mkdir()
    artifact.save(dest, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init"]


def test_one_writer_per_output(tmp_path):
    """A second writer fails at once, naming the holder; the holder is another process."""
    dest = tmp_path / "run"
    code = ("import sys, time; from loraga_ray.core.files import output_lock\n"
            "with output_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(dest)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=rf"being written by another loraga-ray run \(pid {holder.pid} on host "):
            with output_lock(dest):
                pass
        with pytest.raises(OutputError, match="being written by another"):
            with atomic_folder(dest, kind="adapter"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with output_lock(dest):  # free again once the holder is gone
        with output_lock(dest):  # and re-entrant within a process
            pass
    assert not (tmp_path / ".run.lock").exists()


# ------------------------------------------------------------------------- broken artifacts


def _broken(artifact, tmp_path, name) -> Path:
    return artifact.save(tmp_path / name)


@pytest.mark.parametrize("damage, match", [
    ("truncate", "does not match meta.json .*different writes, or the factors are damaged or truncated"),
    ("flip", "does not match meta.json"),
    ("meta-not-json", "meta.json is not valid JSON"),
    ("meta-lacks-key", "lacks 'k'"),
    ("newer-version", "newer loraga-ray \\(format version 3, this one reads up to 2\\)"),
    ("nan", "holds NaN or Inf"),
    ("shape", "expected U\\(\\d+, 4\\)"),
    ("unreadable", "cannot be read .*truncated or damaged"),
])
def test_damaged_artifacts_are_refused_with_the_file_and_the_fix(damage, match, artifact, tmp_path):
    dest = _broken(artifact, tmp_path, "init")
    fac, meta_path = dest / FACTORS_FILE, dest / META_FILE
    meta = json.loads(meta_path.read_text())
    if damage == "truncate":
        fac.write_bytes(fac.read_bytes()[: fac.stat().st_size // 2])
    elif damage == "flip":
        data = bytearray(fac.read_bytes())
        data[-5] ^= 0xFF
        fac.write_bytes(bytes(data))
    elif damage == "meta-not-json":
        meta_path.write_text(meta_path.read_text()[:-10])
    elif damage == "meta-lacks-key":
        del meta["k"]
        meta_path.write_text(json.dumps(meta))
    elif damage == "newer-version":
        meta["format_version"] = 3
        meta_path.write_text(json.dumps(meta))
    elif damage in ("nan", "shape", "unreadable"):
        # factors consistent with the checksum, but wrong inside: only the content checks catch these
        name = artifact.target_modules[0]
        tensors = {f"{n}.{p}": t for n, f in artifact.factors.items() for p, t in zip("USV", f)}
        if damage == "nan":
            tensors[f"{name}.S"] = tensors[f"{name}.S"].clone()
            tensors[f"{name}.S"][0] = float("nan")
        if damage == "shape":
            tensors[f"{name}.U"] = tensors[f"{name}.U"][:-1].contiguous()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(fac))
        if damage == "unreadable":
            fac.write_bytes(b"\x00" * 64)
        meta["factors_sha256"] = files_sha(fac)
        meta_path.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=match) as e:
        InitArtifact.load(dest)
    assert str(dest) in str(e.value)  # names the file (or folder)
    assert damage == "newer-version" or "Estimate it again" in str(e.value)  # and the fix


def files_sha(path: Path) -> str:
    from loraga_ray.core.artifact import file_sha256

    return file_sha256(path)


def test_version_1_artifacts_still_load(artifact, tmp_path):
    """Written exactly as 0.1.0's InitArtifact.save wrote them: no checksum, format_version 1."""
    dest = tmp_path / "v1"
    dest.mkdir()
    tensors = {f"{n}.{p}": t.contiguous() for n, f in artifact.factors.items() for p, t in zip("USV", f)}
    save_file(tensors, str(dest / FACTORS_FILE), metadata={"format": "loraga-ray-init", "format_version": "1"})
    meta = {k: v for k, v in artifact.meta.items() if k != "factors_sha256"}
    meta["format_version"] = 1
    (dest / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    back = InitArtifact.load(dest)
    assert back.meta["format_version"] == 1
    for name in artifact.target_modules:
        torch.testing.assert_close(back.factors[name][1], artifact.factors[name][1])
    apply_lora_ga(tiny_llama(), back, rank=2, alpha=4)
    # and it counts as our own artifact: replaced with --overwrite, refused without
    with pytest.raises(OutputError, match="already holds a loraga-ray init artifact"):
        back.save(dest)
    back.save(dest, overwrite=True)
    assert InitArtifact.load(dest).meta["format_version"] == 2


def test_remote_factors_and_meta_from_different_writes_are_refused(artifact, tmp_path):
    """Through a pyarrow filesystem on local disk standing in for s3:// / gs://: two writers race
    on one prefix, and the reader sees A's meta.json with B's factors."""
    import pyarrow.fs

    bucket = tmp_path / "bucket"
    bucket.mkdir()
    fs = pyarrow.fs.SubTreeFileSystem(str(bucket), pyarrow.fs.LocalFileSystem())
    storage.save_artifact(artifact, "a", filesystem=fs)
    other = InitArtifact({n: (U, S * 2, V) for n, (U, S, V) in artifact.factors.items()}, dict(artifact.meta))
    storage.save_artifact(other, "b", filesystem=fs)
    (bucket / "a" / FACTORS_FILE).write_bytes((bucket / "b" / FACTORS_FILE).read_bytes())
    with pytest.raises(ArtifactError, match="different writes"):
        storage.load_artifact("a", filesystem=fs)
    with pytest.raises(OutputError, match="already holds an init artifact. Pass --overwrite"):
        storage.save_artifact(artifact, "b", filesystem=fs)
    storage.save_artifact(artifact, "b", filesystem=fs, overwrite=True)
    assert storage.load_artifact("b", filesystem=fs).meta["factors_sha256"] == artifact.meta["factors_sha256"]
    (bucket / "c").mkdir()
    (bucket / "c" / "data.parquet").write_bytes(b"x")
    with pytest.raises(OutputError, match="not an init artifact \\(data.parquet\\)"):
        storage.save_artifact(artifact, "c", filesystem=fs, overwrite=True)
    assert os.listdir(bucket / "c") == ["data.parquet"]


# ------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("name", ["alpha", "gamma"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -1.0])
def test_apply_lora_ga_refuses_bad_alpha_and_gamma(artifact, name, value):
    model = tiny_llama()
    kwargs = {"alpha": 4.0, "gamma": 16.0, name: value}
    with pytest.raises(ValueError, match=f"{name} must be a positive finite number"):
        apply_lora_ga(model, artifact, rank=2, **kwargs)
    assert not hasattr(model, "peft_config")  # nothing applied


def test_merged_model_round_trip_still_works(tmp_path):
    task = "seq-cls"
    art = estimate_init(tiny_bert(), batches(make_examples(8, task), 4, task), max_rank=2)
    model = apply_lora_ga(tiny_bert(), art, rank=2, alpha=4)
    save_merged(model, tmp_path / "merged")
    assert (tmp_path / "merged" / files.MARKER).is_file() and files.output_kind(tmp_path / "merged") == "merged model"


# ------------------------------------------------------------------------- the jobs' output folders


@pytest.fixture
def tiny_cls_data(tmp_path):
    rows = [{"text": f"a {'great' if i % 2 else 'dull'} film", "label": i % 2} for i in range(32)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _jobs(tiny_bert_dir, data, out):
    from loraga_ray import InitOptions, SearchOptions, TrainOptions, fit, run_init, search
    from loraga_ray.jobs.demo import run_demo
    from loraga_ray.options import DemoOptions

    base = TrainOptions(model=str(tiny_bert_dir), data=data, out=str(out), init="lora", max_steps=2, batch_size=4)
    return {
        "init": lambda: run_init(InitOptions(model=str(tiny_bert_dir), data=data, out=str(out), progress=False)),
        "train": lambda: fit(base),
        "tune": lambda: search(base, SearchOptions(space="tune_spaces/rank.yaml"), out=str(out)),
        "demo": lambda: run_demo(DemoOptions(model=str(tiny_bert_dir), data=data, out=str(out))),
    }


@pytest.mark.parametrize("job", ["init", "train", "tune", "demo"])
def test_jobs_refuse_a_users_folder_before_any_work(job, tiny_bert_dir, tiny_cls_data, tmp_path):
    """0.1.0's train/tune/demo wrote their files into any existing folder, and init replaced it."""
    out = _user_folder(tmp_path / "mine")
    with pytest.raises(OutputError, match="files loraga-ray did not write.*nothing in it was touched"):
        _jobs(tiny_bert_dir, tiny_cls_data, out)[job]()
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("job", ["init", "train", "tune", "demo"])
def test_jobs_refuse_a_second_writer_at_once(job, tiny_bert_dir, tiny_cls_data, tmp_path):
    out = tmp_path / "out"
    code = ("import sys, time; from loraga_ray.core.files import output_lock\n"
            "with output_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=rf"pid {holder.pid} on host"):
            _jobs(tiny_bert_dir, tiny_cls_data, out)[job]()
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()


# ------------------------------------------------------------------------- the command line's errors


def test_cli_errors_are_one_message_even_from_inside_ray(monkeypatch, capsys, tmp_path):
    """Our errors come out as one line and exit 1, also when Ray wraps them (a task's error
    carries the remote traceback in its text); anything else is named, without a traceback."""
    from ray.exceptions import RayTaskError

    from loraga_ray.cli import main
    from loraga_ray.jobs import init as init_job

    def wrapped(err):
        try:
            raise err
        except Exception as e:
            import traceback

            return RayTaskError("GradientWorker.setup", traceback.format_exc(), e).as_instanceof_cause()

    argv = ["init", "--model", "m", "--data", "d", "--out", str(tmp_path / "o")]
    for err, want in [(ArtifactError("the artifact is damaged. Estimate it again"), "the artifact is damaged. Estimate it again"),
                      (OutputError("out is busy"), "out is busy"),
                      (KeyError("weights"), "unexpected KeyError: 'weights' (run with -v for the traceback")]:
        for raised in (err, wrapped(err)):
            monkeypatch.setattr(init_job, "run_init", lambda opts, raised=raised: (_ for _ in ()).throw(raised))
            assert main(argv) == 1
            lines = capsys.readouterr().err.strip().splitlines()
            assert lines[-1].startswith(f"loraga-ray init: error: {want}")
            assert not any("Traceback" in line for line in lines), lines


# ------------------------------------------------------------------------- labels and empty rows


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_labels_are_refused_naming_the_split_and_row(tmp_path, tiny_bert_dir):
    from loraga_ray import TrainOptions
    from loraga_ray.data import load_split
    from loraga_ray.jobs.run_plan import plan_run

    folder = tmp_path / "data"
    folder.mkdir()
    good = [{"text": f"a {'great' if i % 2 else 'dull'} film", "label": i % 2} for i in range(16)]
    _jsonl(folder / "train.jsonl", good[:5] + [{"text": "odd", "label": -1}] + good[5:])
    with pytest.raises(ValueError, match=r"train\): row 5 has label -1, but labels must be class ids 0..num_labels-1"):
        load_split(str(folder), "train")
    _jsonl(folder / "train.jsonl", good)
    _jsonl(folder / "validation.jsonl", good[:3] + [{"text": "three", "label": 3}])
    opts = TrainOptions(model=str(tiny_bert_dir), data=str(folder), out=str(tmp_path / "o"), init="lora", batch_size=4)
    with pytest.raises(ValueError, match=r"evaluation: validation split\): row 3 has label 3, but labels must be class "
                                         r"ids 0..1 \(the training split's classes\)"):
        plan_run(opts)
    assert not (tmp_path / "o").exists()


def test_empty_rows_are_dropped_with_a_count(tmp_path):
    from loraga_ray.data import load_split

    rows = [{"text": "fine", "label": 1}, {"text": "   ", "label": 0}, {"text": "", "label": 1}, {"text": None, "label": 0}]
    with pytest.warns(UserWarning, match="dropped 3 of 4 rows with null values or empty text"):
        table = load_split(_jsonl(tmp_path / "cls.jsonl", rows), hold_out=False)
    assert table.column("text").to_pylist() == ["fine"]
    rows = [{"prompt": "1+1=", "response": " 2"}, {"prompt": "2+2=", "response": " "}]
    with pytest.warns(UserWarning, match="dropped 1 of 2 rows with null values or an empty response"):
        assert load_split(_jsonl(tmp_path / "lm.jsonl", rows), hold_out=False).num_rows == 1


# ------------------------------------------------------------------------- broken model folders


def test_model_folders_with_missing_damaged_or_pickled_weights(tiny_bert_dir, tmp_path):
    """A clear error naming the folder (or file), before any worker starts; pickled weights only
    with allow_pickle_weights. 0.1.0 unpickled pytorch_model.bin and reported damaged files
    with transformers' own tracebacks from inside the workers."""
    import shutil

    from transformers import AutoModelForSequenceClassification

    from loraga_ray import InitOptions, run_init
    from loraga_ray.models import ModelLoadError, load_model, resolve_model

    def copy(name):
        return Path(shutil.copytree(tiny_bert_dir, tmp_path / name))

    missing = copy("missing")
    (missing / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=rf"{missing} has config.json but no weights"):
        resolve_model(str(missing))
    truncated = copy("truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match=rf"{weights} is damaged or truncated"):
        run_init(InitOptions(model=str(truncated), data="demo-rotten-tomatoes", progress=False))
    pickled = copy("pickled")
    (pickled / "model.safetensors").unlink()  # the same weights, as the pickle older tools wrote
    torch.save(AutoModelForSequenceClassification.from_pretrained(str(tiny_bert_dir)).state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pytorch_model.bin, a pickle.*--allow-pickle-weights"):
        resolve_model(str(pickled))
    spec = resolve_model(str(pickled), allow_pickle_weights=True)
    reference = load_model(resolve_model(str(tiny_bert_dir)))
    loaded = load_model(spec)
    torch.testing.assert_close(loaded.bert.encoder.layer[0].attention.self.query.weight,
                               reference.bert.encoder.layer[0].attention.self.query.weight)
    opts = InitOptions(model=str(pickled), data="d")
    assert opts.allow_pickle_weights is False  # off unless asked


# ------------------------------------------------------------------------- credentials


SECRET = "s3cr3t-Value"


def test_redaction_of_urls():
    from loraga_ray.redact import redact, redact_obj

    cases = {
        f"postgresql://ml:{SECRET}@db.internal:5432/mlflow": "postgresql://ml:***@db.internal:5432/mlflow",
        f"https://mlflow.example/api?token={SECRET}&x=1": "https://mlflow.example/api?token=***&x=1",
        f"s3://b/k?X-Amz-Credential={SECRET}&X-Amz-Signature={SECRET}": "s3://b/k?X-Amz-Credential=***&X-Amz-Signature=***",
        "sqlite:////runs/mlflow.db": "sqlite:////runs/mlflow.db",
        "http://127.0.0.1:5000": "http://127.0.0.1:5000",
    }
    for raw, want in cases.items():
        assert redact(raw) == want
    assert redact_obj({"a": [f"x://u:{SECRET}@h"], "n": 3}) == {"a": ["x://u:***@h"], "n": 3}


def test_credentials_never_reach_files_mlflow_or_logs(tmp_path, mlflow_store, monkeypatch):
    import logging

    from mlflow.tracking import MlflowClient

    from loraga_ray import tracking
    from loraga_ray.core.files import write_json
    from loraga_ray.redact import RedactingFilter, restore

    uri = f"postgresql://ml:{SECRET}@db.internal/mlflow"
    data = f"https://data.example/train.parquet?token={SECRET}"
    write_json(tmp_path / "run.json", {"tracking_uri": uri, "nested": {"data": data}})
    text = (tmp_path / "run.json").read_text()
    assert SECRET not in text and "postgresql://ml:***@db.internal/mlflow" in text
    run_id = tracking.create_run(mlflow_store, "secrets", params={"data": data}, tags={"loraga.out": uri})
    run = MlflowClient(mlflow_store).get_run(run_id)
    assert SECRET not in json.dumps(run.data.params) + json.dumps(run.data.tags)
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Keep()
    handler.addFilter(RedactingFilter())
    log = logging.getLogger("loraga_ray.test_redaction")
    log.addHandler(handler)
    log.warning("connecting to %s", uri)
    log.removeHandler(handler)
    assert records == ["connecting to postgresql://ml:***@db.internal/mlflow"]
    # a resume finds the masked URI in its files: the real one comes from MLFLOW_TRACKING_URI
    with pytest.raises(ValueError, match="held credentials, which loraga-ray never writes to disk; set MLFLOW_TRACKING_URI"):
        restore("postgresql://ml:***@db.internal/mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert restore("postgresql://ml:***@db.internal/mlflow") == uri


def test_cli_error_with_a_password_in_the_tracking_uri(tiny_bert_dir, tmp_path, capsys):
    import socket

    from loraga_ray.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(16)))
    out = tmp_path / "o"
    rc = main(["train", "--model", str(tiny_bert_dir), "--data", str(data), "--init", "lora", "--batch-size", "4",
               "--out", str(out), "--tracking-uri", f"http://ml:{SECRET}@127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert rc == 1 and "cannot open the MLflow tracking store" in err
    assert SECRET not in err and "ml:***@127.0.0.1" in err
    assert not out.exists()


# ------------------------------------------------------------------------- what --resume resumes


def test_resume_refuses_a_missing_or_changed_artifact(tiny_bert_dir, tiny_cls_data, tmp_path, artifact):
    """0.1.0 silently estimated a new init when a stopped run's init_artifact/ was missing, and
    resumed the old checkpoints on top of it."""
    import dataclasses

    from loraga_ray import TrainOptions, fit
    from loraga_ray.core.files import write_json, write_marker

    out = tmp_path / "run"
    out.mkdir()
    opts = TrainOptions(model=str(tiny_bert_dir), data=tiny_cls_data, out=str(out), init="lora-ga", max_steps=2, batch_size=4)
    write_marker(out, "training run")
    write_json(out / "train_options.json", dict(dataclasses.asdict(opts), artifact=None, artifact_sha256="ab" * 32))
    resume = dataclasses.replace(opts, resume=True)
    with pytest.raises(ValueError, match=r"init artifact this run started from .*init_artifact\) is missing.*never estimates"):
        fit(resume)
    artifact.save(out / "init_artifact")
    with pytest.raises(ValueError, match=r"changed since this run started .*the run recorded abababababab"):
        fit(resume)


def test_tune_resume_refuses_a_folder_it_did_not_create(tmp_path):
    """Resuming unpickles Ray Tune's state: a search folder without this tool's marker (or whose
    marker's id differs from search.json's) is refused before anything is read from it."""
    from loraga_ray import SearchOptions, search
    from loraga_ray.core.files import write_marker
    from loraga_ray.options import SearchError

    out = tmp_path / "search"
    out.mkdir()
    (out / "search.json").write_text(json.dumps({"base": {}, "space": {}, "search": {}, "search_id": "1234"}))
    with pytest.raises(SearchError, match="was not created by loraga-ray tune.*unpickles Ray Tune's saved state"):
        search(None, SearchOptions(resume=True), out=out)
    write_marker(out, "search", search_id="5678")
    with pytest.raises(SearchError, match="do not carry the same search id"):
        search(None, SearchOptions(resume=True), out=out)


# ------------------------------------------------------------------------------------------------
# --overwrite of a training run or a search: the old one waits aside until the new one ends well
# ------------------------------------------------------------------------------------------------


def old_run(tmp_path, kind: str = "training run") -> Path:
    out = tmp_path / "run"
    out.mkdir()
    files.write_marker(out, kind)
    (out / "metrics.json").write_text('{"final": "old"}')
    (out / "ray").mkdir()
    (out / "ray" / "checkpoint").write_text("old checkpoint")
    return out


def complete(out: Path) -> bool:
    return (out / "metrics.json").is_file()


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_keeps_the_old_run_until_the_new_one_ends_well(tmp_path):
    out = old_run(tmp_path)
    with files.replacing(out, "training run", complete, overwrite=True):
        assert not (out / "metrics.json").exists()  # the new run starts in an empty folder...
        (aside,) = files._replaced(out)  # ...while the old one waits beside it, whole
        assert snapshot(aside)["metrics.json"] == b'{"final": "old"}'
        out.mkdir()
        files.write_marker(out, "training run")
        (out / "metrics.json").write_text('{"final": "new"}')
    assert (out / "metrics.json").read_text() == '{"final": "new"}'
    assert files._replaced(out) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_failed_overwrite_puts_the_old_run_back(tmp_path):
    out = old_run(tmp_path)
    before = snapshot(out)
    with pytest.raises(RuntimeError, match="diverged"):
        with files.replacing(out, "training run", complete, overwrite=True):
            out.mkdir()
            (out / "half-written").write_text("x")
            raise RuntimeError("diverged")
    assert snapshot(out) == before and files._replaced(out) == []


@pytest.mark.parametrize("finished", [False, True])
def test_a_killed_overwrite_is_sorted_out_by_the_next_run(tmp_path, finished):
    """SIGKILL (os._exit) inside the replacement, in a process of its own: the next run on the
    folder brings the old run back, or, if the new one had completed, drops the old one."""
    out = old_run(tmp_path)
    before = snapshot(out)
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from loraga_ray.core import files\n"
        f"out = Path({str(out)!r})\n"
        "with files.replacing(out, 'training run', lambda o: (o / 'metrics.json').is_file(), overwrite=True):\n"
        "    out.mkdir()\n"
        "    files.write_marker(out, 'training run')\n"
        "    (out / 'ray').mkdir()\n"
        + ("    (out / 'metrics.json').write_text('new')\n" if finished else "") +
        "    os._exit(9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert len(files._replaced(out)) == 1  # both are on disk
    files.recover_replaced(out, "training run", complete)
    assert files._replaced(out) == []
    if finished:
        assert (out / "metrics.json").read_text() == "new"
    else:
        assert snapshot(out) == before


def test_overwrite_never_touches_a_users_folder(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="files loraga-ray did not write.*nothing in it was touched"):
        with files.replacing(out, "training run", complete, overwrite=True):
            raise AssertionError("must not run")
    assert snapshot(out) == {"notes.txt": b"mine"}


def test_overwrite_with_resume_or_an_artifact_inside_out_is_refused(tmp_path):
    from loraga_ray.options import SearchOptions, TrainOptions

    with pytest.raises(ValueError, match="--overwrite and --resume contradict"):
        TrainOptions(model="m", data="d", out=str(tmp_path), overwrite=True, resume=True).validate()
    with pytest.raises(ValueError, match="lies inside --out .* which --overwrite replaces"):
        TrainOptions(model="m", data="d", out=str(tmp_path), overwrite=True,
                     artifact=str(tmp_path / "init_artifact")).validate()
    with pytest.raises(ValueError, match="--overwrite and --resume contradict"):
        SearchOptions(space="s.yaml", overwrite=True, resume=True).validate(TrainOptions(model="m", data="d", out="o"))


def test_resume_after_a_killed_overwrite_continues_the_new_run(tmp_path):
    """A --overwrite run killed mid-way, then --resume: the half-made new run is what is resumed
    (kept, not swapped back); the old one waits aside until the resumed run completes."""
    out = old_run(tmp_path)
    aside = tmp_path / f".run{files.REPLACED}killed"
    out.rename(aside)  # what a killed --overwrite leaves: the old run aside, the new one half-made
    out.mkdir()
    files.write_marker(out, "training run")
    (out / "ray").mkdir()
    (out / "ray" / "checkpoint").write_text("new checkpoint")
    with files.replacing(out, "training run", complete, overwrite=False, resume=True):
        assert (out / "ray" / "checkpoint").read_text() == "new checkpoint" and aside.exists()
        (out / "metrics.json").write_text('{"final": "resumed"}')
    assert (out / "metrics.json").read_text() == '{"final": "resumed"}' and not aside.exists()


def test_overwrite_needs_our_marker_not_just_familiar_file_names(tmp_path):
    """A folder that merely holds a run.json (a common name) is not taken for ours."""
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "run.json").write_text("{}")
    (out / "train_options.json").write_text("{}")
    with pytest.raises(OutputError, match="no .loraga-ray.json.*leaves it alone"):
        with files.replacing(out, "training run", complete, overwrite=True):
            raise AssertionError("must not run")
    assert sorted(p.name for p in out.iterdir()) == ["run.json", "train_options.json"]
