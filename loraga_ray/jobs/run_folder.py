"""The output folder of a training run: what it holds, the checks before a run starts or resumes
in it, and the outputs written from the run's last checkpoint.

    <out>/train_options.json   the options of the run (``--resume`` reads them)
    <out>/run.json             the MLflow run it logs to
    <out>/init_artifact/       the LoRA-GA artifact, when the run estimated it
    <out>/ray/                 the Ray Train run: checkpoints (``--resume`` continues from the last)
    <out>/adapter/ or model/   the deliverable: a PEFT adapter for the original base, or full weights
    <out>/metrics.json, loss_curve.png, singular_values.png, mlflow.db
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import MISSING, asdict, fields
from pathlib import Path

from ..core.files import MARKER, OutputError, atomic_folder, output_kind, replacing, write_json, write_marker
from ..options import RUN_DEFINING, TrainOptions
from ..training.checkpoints import EXPORT_DIR, STATE_FILE

OPTIONS_FILE = "train_options.json"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
LOSS_CURVE_FILE = "loss_curve.png"
SINGULAR_VALUES_FILE = "singular_values.png"
INIT_ARTIFACT_DIR = "init_artifact"
RAY_DIR = "ray"
RAY_RUN_NAME = "train"


def saved_options(out: Path) -> dict | None:
    """The options saved in a run folder, or None when it holds none."""
    path = Path(out) / OPTIONS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def check_ours(out: Path, kind: str) -> None:
    """Refuse, touching nothing, an existing ``out`` with files in it that is not our ``kind``."""
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"{out} is an existing file, not a folder; nothing was written. Choose another --out.")
    found = output_kind(out)
    if any(out.iterdir()) and found != kind:
        what = f"a loraga-ray {found}" if found else "files loraga-ray did not write"
        raise OutputError(f"--out {out} already exists and holds {what}, not a loraga-ray {kind}; nothing in it was "
                          "touched. Choose another --out, or move that folder away yourself.")


def claim(out: Path, kind: str, **extra) -> None:
    """Create ``out`` (checked with :func:`check_ours`) and mark it as ours (``extra`` goes into
    the marker)."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).is_file():
        write_marker(out, kind, **extra)


def check_out_folder(opts: TrainOptions, out: Path) -> dict | None:
    """Refuse a folder that is not a training run of ours, and to mix runs in one folder; on
    --resume, check the options match the stopped run. Returns the saved options when resuming."""
    check_ours(out, "training run")
    saved = saved_options(out)
    if not opts.resume:
        if saved is not None or (out / RAY_DIR).exists():
            raise ValueError(f"{out} already holds a training run. Pass --resume to continue it, or choose another --out.")
        return None
    if saved is None:
        raise ValueError(f"--resume: {out} holds no training run to continue (no {OPTIONS_FILE}). Drop --resume to start one.")
    current = asdict(opts)
    # a key an older version did not save had its default then
    defaults = {f.name: f.default for f in fields(TrainOptions) if f.default is not MISSING}
    differ = [k for k in RUN_DEFINING if k != "artifact" and saved.get(k, defaults.get(k)) != current.get(k)]
    if current.get("artifact") not in (None, saved.get("artifact")):
        differ.append("artifact")
    if differ:
        pairs = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differ)
        raise ValueError(f"--resume must keep the options of the stopped run in {out}; these differ: {pairs}. "
                         "Drop them (the saved ones are used) or start a new run in another --out.")
    return saved


def read_run_record(out: Path) -> dict:
    path = out / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def summarise(history: list[dict], done: bool) -> dict:
    """The last step's metrics, with the latest evaluation when the last step had none."""
    final = dict(history[-1]) if history else {}
    for h in reversed(history):
        for k, v in h.items():
            if k.startswith("eval_") and k not in final:
                final[k] = v
    final["done"] = done
    return final


def write_outputs(opts: TrainOptions, result, out: Path, mlflow_run_id: str | None, tracking_uri: str | None,
                  started: float | None = None) -> dict:
    """From the last checkpoint of a finished (or stopped) run, write ``out``: adapter/ or model/,
    metrics.json and loss_curve.png; log them to MLflow. Returns the metrics."""
    from .. import tracking
    from ..plots import plot_loss_curve
    from ..training.checkpoints import label_maps

    checkpoint = result.checkpoint
    if checkpoint is None:
        raise RuntimeError(f"the run reported no checkpoint; nothing to export (storage: {getattr(result, 'path', '?')}).")
    out.mkdir(parents=True, exist_ok=True)
    kind = "model" if opts.init == "full" else "adapter"
    with checkpoint.as_directory() as d:
        d = Path(d)
        state = json.loads((d / STATE_FILE).read_text())
        done = bool(state.get("done"))
        if done:
            # inside this run's own (locked) folder: a re-export after --resume replaces the last one
            with atomic_folder(out / kind, kind="adapter" if kind == "adapter" else "merged model", overwrite=True) as tmp:
                shutil.copytree(d / EXPORT_DIR / kind, tmp, dirs_exist_ok=True)
    history = state["history"]
    final = summarise(history, done)
    wall_s = round(time.time() - started, 2) if started else None
    write_json(out / METRICS_FILE, {
        "final": final,
        "history": history,
        "run": {
            "init": opts.init, "model": opts.model, "data": opts.data, "total_steps": state.get("total_steps"),
            "steps": state.get("step"), "wall_s": wall_s, "output": str(out / kind) if done else None,
            "checkpoint": checkpoint.path, "mlflow_run_id": mlflow_run_id, "tracking_uri": tracking_uri,
            **(label_maps(state["label_names"]) if state.get("label_names") else {}),
        },
    })
    plot_loss_curve(history, out / LOSS_CURVE_FILE, title=f"{opts.init} r={opts.rank} lr={opts.lr:g} on {Path(str(opts.data)).name}")
    if mlflow_run_id and tracking_uri:
        tracking.log_artifacts(tracking_uri, mlflow_run_id, out / LOSS_CURVE_FILE)
        tracking.log_artifacts(tracking_uri, mlflow_run_id, out / METRICS_FILE)
        if done and kind == "adapter":
            tracking.log_artifacts(tracking_uri, mlflow_run_id, out / kind, kind)
        tracking.set_status(tracking_uri, mlflow_run_id, "FINISHED" if done else "KILLED")
    return dict(final, history=history, out=str(out), mlflow_run_id=mlflow_run_id, tracking_uri=tracking_uri,
                wall_s=wall_s)


@contextlib.contextmanager
def replacing_folder(out: Path, kind: str, complete, overwrite: bool, resume: bool):
    """:func:`loraga_ray.core.files.replacing` for a run or search folder (``--overwrite``). Its
    default MLflow store, ``mlflow.db``, moves aside and back with it, so the database engines
    MLflow keeps open for that file are dropped before the new one starts and after either ends."""
    from .. import tracking

    try:
        with replacing(out, kind, complete, overwrite, resume=resume):
            if overwrite:
                tracking.forget_open_stores(out)
            yield
    finally:
        if overwrite:
            tracking.forget_open_stores(out)
