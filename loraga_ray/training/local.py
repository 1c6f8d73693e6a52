"""A single-worker CPU run in the calling process: the loop of :mod:`loraga_ray.training.loop`,
the same code a Ray Train worker runs, without a Train controller and a worker process to start.

A search's trials use it when each trial is one CPU worker (``loraga-ray tune --trial-runner
auto``, the default): per trial that spares the start of two Ray actors, each importing torch and
transformers, and a Ray Data split coordinator, which on 2 CPU cores was about a third of a
MiniLM trial (``benchmarks/results/trial_runner.md``). What Ray Train gave such a trial is kept:

* checkpoints go to ``<storage>/<name>/checkpoint_<step>`` (the two newest are kept), and a run
  started again in the same place resumes from the newest, with the same data order and
  optimizer state (a Tune trial restarted after a failure, or ``tune --resume``);
* reports reach the same callbacks (MLflow, Tune) with the same metrics;
* the data streams are Ray Data's, with Train's ingest options (order preserved).

A lost trial process ends the run; Tune restarts the trial (``max_failures`` as for Ray Train)
and it resumes from its last checkpoint."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from .loop import Session, run_loop

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d{8})$")
PARTIAL_RE = re.compile(r"^\.checkpoint_\d{8}\.[0-9a-f]{8}\.tmp$")  # a copy a lost process left unfinished
KEEP_CHECKPOINTS = 2  # as the Ray Train runs' CheckpointConfig(num_to_keep=2)


@dataclass
class LocalResult:
    """What :func:`run_local` returns: as much of a Ray Train ``Result`` as the run folder reads."""

    checkpoint: object | None  # ray.train.Checkpoint of the newest checkpoint
    path: str
    metrics: dict | None
    error: BaseException | None = None


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """This runner's checkpoints in ``folder``, oldest first (other names are not ours: left alone)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


class LocalSession(Session):
    """The loop's session for a run in this process (rank 0 of 1, CPU)."""

    def __init__(self, datasets: dict, folder: str | os.PathLike, callbacks=(), execution_options=None):
        from ray.train import Checkpoint

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.streams = {}
        for name, ds in datasets.items():
            ds = ds.copy(ds)  # as Ray Train's DataConfig does: the caller's dataset keeps its options
            if execution_options is not None:
                ds.context.execution_options = execution_options
            self.streams[name] = ds
        self.callbacks = list(callbacks)
        for partial in (p for p in self.folder.iterdir() if PARTIAL_RE.match(p.name)):
            shutil.rmtree(partial, ignore_errors=True)
        found = _checkpoints(self.folder)
        self.latest = Checkpoint.from_directory(str(found[-1][1])) if found else None
        self.last_metrics = None

    def device(self, cuda: bool) -> torch.device:
        if cuda:
            raise ValueError("a run in the calling process is CPU-only; a CUDA run goes through Ray Train")
        return torch.device("cpu")

    def checkpoint(self):
        return self.latest

    def dataset(self, name: str):
        return self.streams[name].iterator()

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        from ray.train import Checkpoint

        checkpoint = tmp = None
        if checkpoint_dir is not None:
            dest = self.folder / f"checkpoint_{int(metrics['step']):08d}"
            tmp = self.folder / f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp"
            shutil.copytree(checkpoint_dir, tmp)
            checkpoint = Checkpoint.from_directory(str(dest))
        # The report is handed on before its checkpoint counts: a process lost in between resumes
        # from the previous checkpoint and runs those steps again (MLflow logs each step once), where
        # the other order would lose the steps since the last report from MLflow.
        # Callbacks run in their order; a Tune stop (ASHA) raises SystemExit inside tune.report, so
        # the Tune callback comes last (build_trainer) and the checkpoint is committed all the same.
        self.last_metrics = metrics
        try:
            for callback in self.callbacks:
                callback.after_report(None, [metrics], checkpoint)
        finally:
            if tmp is not None:
                if dest.exists():  # the same step written again by a run that resumed before it: ours
                    shutil.rmtree(dest)
                os.replace(tmp, dest)  # a checkpoint is whole or absent
                self.latest = checkpoint
                for _, old in _checkpoints(self.folder)[:-KEEP_CHECKPOINTS]:
                    shutil.rmtree(old, ignore_errors=True)


def run_local(config: dict, datasets: dict, folder: str | os.PathLike, callbacks=(), execution_options=None) -> LocalResult:
    """Run the loop of ``config`` (as :func:`loraga_ray.jobs.train.train_config` builds it) here,
    its checkpoints in ``folder``; returns the newest checkpoint, as a Ray Train run's result does."""
    if config["cuda"]:
        raise ValueError("run_local: a CUDA run goes through Ray Train")
    session = LocalSession(datasets, folder, callbacks, execution_options)
    run_loop(config, session)
    return LocalResult(checkpoint=session.latest, path=str(session.folder), metrics=session.last_metrics)
