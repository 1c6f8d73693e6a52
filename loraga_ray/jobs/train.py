"""``loraga-ray train``: one fine-tuning run on Ray Train (LoRA-GA, LoRA, PiSSA, PEFT's LoRA-GA
or full fine-tuning), from the command line or :func:`fit`.

:func:`fit` reads top to bottom:

1. checks everything that can be checked cheaply (options, the output folder, the data, the
   rank against the model's layer shapes on a weightless copy, the artifact's fit and
   fingerprint, the cluster's size, the MLflow store);
2. for ``--init lora-ga`` (or ``lora-one``) without ``--artifact``, estimates the init first (the distributed
   pipeline of :mod:`loraga_ray.jobs.init`) and keeps the artifact in ``<out>/init_artifact``;
3. runs a Ray Train ``TorchTrainer`` (:func:`build_trainer`; the loop is
   :mod:`loraga_ray.training.loop`): N workers with DDP (gloo on CPU, NCCL on GPU), the training
   examples streamed and sharded by Ray Data in an order fixed by the seed;
4. writes ``<out>`` (:mod:`loraga_ray.jobs.run_folder`) and records the run in MLflow.

Batch size is the *global* batch (examples per optimizer step); each of the N workers gets
batch_size / N. ``--resume`` continues a stopped run from its last checkpoint with the same data
order and optimizer state. Train V2 resumes a run with the same ``(storage_path, name)``; here
that is ``<out>/ray`` and ``train``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

from .. import tracking
from ..core.artifact import InitArtifact
from ..core.files import output_lock, write_json
from ..redact import redact, restore
from ..options import ARTIFACT_INITS, TrainOptions, artifact_max_rank
from .resources import WorkerResources, plan_workers
from .run_folder import (
    INIT_ARTIFACT_DIR,
    METRICS_FILE,
    OPTIONS_FILE,
    RAY_DIR,
    RAY_RUN_NAME,
    RUN_FILE,
    SINGULAR_VALUES_FILE,
    check_out_folder,
    claim,
    read_run_record,
    replacing_folder,
    write_outputs,
)
from .run_plan import RunPlan, build_datasets, check_artifact_fits, check_artifact_weights, plan_run
from .train_strategy import TrainDecision, decide_train

log = logging.getLogger(__name__)

__all__ = ["TrainOptions", "fit", "build_trainer", "plan_train_workers", "create_mlflow_run"]


def plan_train_workers(opts: TrainOptions) -> WorkerResources:
    """The Train workers' reservation; one CPU stays free for Ray Data. Ray must be initialised."""
    return plan_workers("Train workers", opts.workers, gpus_per_worker=opts.gpus_per_worker,
                        cpus_per_worker=opts.cpus_per_worker, address=opts.address, device=opts.device,
                        spare_cpus=1.0, probe_cuda=True, can_wait=False)


def local_cpus(opts: TrainOptions, concurrent_runs: int = 1) -> int:
    """Logical CPUs an embedded Ray needs for ``concurrent_runs`` runs: each run's workers plus
    its Ray Data tasks (with only the physical cores, Train workers would hold them all)."""
    import math

    return concurrent_runs * (math.ceil(opts.workers * opts.cpus_per_worker) + 1) + 1


def train_environment(opts: TrainOptions):
    """The Ray Train settings of a run, as the environment of the process that calls
    ``trainer.fit()`` (Train hands RAY_TRAIN_* variables on to its controller): a worker that
    leaves the health check unanswered for ``stall_timeout`` seconds counts as lost."""
    from ..envvars import environment

    return environment(RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S=f"{opts.stall_timeout:g}")


def max_failures(opts: TrainOptions) -> int:
    """Restarts from the last checkpoint after a lost Train worker: the option, else 1 on a
    joined cluster (preemptions happen there) and 0 on an embedded Ray."""
    from .cluster import joins_cluster

    return opts.max_failures if opts.max_failures is not None else (1 if joins_cluster(opts.address) else 0)


def create_mlflow_run(opts: TrainOptions, tracking_uri: str, plan: RunPlan | None = None) -> str:
    """An MLflow run for these options: params, and the parent tag when opts.parent_run_id."""
    params = {k: getattr(opts, k) for k in (
        "model", "data", "init", "rank", "alpha", "gamma", "direction", "scale", "use_rslora", "lr", "batch_size",
        "workers", "seed", "max_steps", "epochs", "warmup_ratio", "weight_decay", "max_grad_norm", "max_length",
        "eval_every", "eval_samples", "target_modules", "artifact", "lora_dropout", "init_samples", "train_strategy",
        "dtype", "activation_checkpointing", "head_lr", "head_warmup_steps", "head_warmup_lr")}
    params["gamma"] = opts.stable_gamma  # the value used (--gamma, or the method's default)
    if plan is not None:
        params.update(task=plan.task, total_steps=plan.total_steps, eval_source=plan.eval_source,
                      num_target_modules=len(plan.target_modules))
        if plan.label_names:
            labels = json.dumps(plan.id2label())
            params["id2label"] = labels if len(labels) <= 6000 else f"{len(plan.label_names)} classes (see metrics.json)"
    tags = {"loraga.init": opts.init, "loraga.out": str(opts.out)}
    name = opts.run_name or (f"{opts.init} lr={opts.lr:g}" if opts.init == "full" else f"{opts.init} r={opts.rank} lr={opts.lr:g}")
    return tracking.create_run(tracking_uri, opts.experiment, params=params, run_name=name,
                               parent_run_id=opts.parent_run_id, tags=tags)


def build_trainer(opts: TrainOptions, *, name: str, storage_path: str, callbacks=(), mlflow_run_id: str | None = None,
                  plan: RunPlan | None = None, resources: WorkerResources | None = None,
                  artifact: InitArtifact | None = None, decision: TrainDecision | None = None,
                  in_process: bool = False):
    """The Ray Train ``TorchTrainer`` of one run. Ray must be initialised.

    ``in_process``: a :class:`LocalTrainer` instead, whose ``fit()`` runs the same loop in this
    process (one CPU worker only; :mod:`loraga_ray.training.local`), its checkpoints under
    ``storage_path/name``. A search's single-worker CPU trials use it.

    Reports (every worker reports the same dict; Ray keeps rank 0's): ``step``, ``train_loss``
    (mean over the steps since the previous report), ``lr``, ``grad_norm``, ``epoch``, and
    ``step_metrics`` (the list of per-step metric dicts since the previous report); at eval steps
    also ``eval_loss`` and ``eval_accuracy`` (seq-cls) or ``eval_exact_match`` (causal-lm). There
    is a report at every eval and checkpoint step, and otherwise every ``opts.report_every`` steps,
    or (None) whenever ~2 s have passed: Ray Train's controller takes one report per poll, so a
    report per step would throttle training. The last report adds ``done: True`` and carries the
    checkpoint with ``export/adapter`` (or ``export/model``). For Tune schedulers use
    ``time_attr="step"``. ``callbacks`` go to the RunConfig (e.g. Tune's ``TuneReportCallback()``).

    init lora-ga needs the artifact: ``artifact`` (loaded) or ``opts.artifact`` (a folder; ``fit``
    estimates one when it is missing). MLflow: metrics go to ``mlflow_run_id`` if given; else,
    when ``opts.tracking_uri`` is set, a new run is created (a child of ``opts.parent_run_id`` if
    set); its id is ``trainer.mlflow_run_id``.
    """
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ..training.build import artifact_payload
    from ..training.loop import train_loop_per_worker, warmup_steps

    opts.validate()
    if opts.init in ARTIFACT_INITS and artifact is None:
        if not opts.artifact:
            raise ValueError(f"build_trainer with init {opts.init} needs an init artifact (artifact= or opts.artifact); "
                             "fit() estimates one when it is missing.")
        artifact = InitArtifact.load(opts.artifact)
    plan = plan or plan_run(opts, artifact)
    resources = resources or plan_train_workers(opts)
    decision = decision or decide_train(opts, plan.task, plan.num_labels, resources)
    if mlflow_run_id is not None and not opts.tracking_uri:
        raise ValueError("build_trainer: mlflow_run_id needs opts.tracking_uri (the store the run lives in).")
    if mlflow_run_id is None and opts.tracking_uri:
        mlflow_run_id = create_mlflow_run(opts, opts.tracking_uri, plan)

    config = {
        "options": asdict(opts),
        "spec": plan.spec,
        "task": plan.task,
        "num_labels": plan.num_labels,
        "label_names": plan.label_names,
        "total_steps": plan.total_steps,
        "steps_per_epoch": plan.steps_per_epoch,
        "warmup_steps": warmup_steps(opts.warmup_ratio, plan.total_steps),
        "cuda": resources.cuda,
        "train_strategy": decision.strategy,
        "dtype": decision.dtype,
        "artifact_ref": ray.put(artifact_payload(artifact)) if opts.init in ARTIFACT_INITS else None,
        # the estimate's sample, drawn here once, for the workers that fit their head on it (or run
        # PEFT's LoRA-GA estimate): they need neither the data's path nor a read of their own
        "estimate_sample_ref": ray.put(estimate_sample(opts, plan)) if needs_estimate_sample(opts) else None,
    }
    all_callbacks = list(callbacks)
    if mlflow_run_id is not None:
        all_callbacks.append(tracking.MlflowReportCallback(opts.tracking_uri, mlflow_run_id))
    ingest = ingest_options()
    if in_process:
        if opts.workers != 1 or resources.cuda:
            raise ValueError(f"build_trainer(in_process=True) runs one CPU worker; this run has {opts.workers} "
                             f"worker(s){' on CUDA' if resources.cuda else ''}: leave in_process off.")
        # MLflow before the caller's callbacks: Tune's stop of a trial (ASHA) ends it inside its report
        ordered = all_callbacks[len(callbacks):] + list(callbacks)
        trainer = LocalTrainer(config, build_datasets(opts, plan), Path(storage_path) / name, ordered, ingest)
        trainer.mlflow_run_id = mlflow_run_id
        return trainer
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if resources.cuda else "gloo"),
        scaling_config=resources.scaling_config(),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_path),
            callbacks=all_callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=max_failures(opts)),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets=build_datasets(opts, plan),
        # One worker reads the stream directly (no split coordinator actor to start).
        dataset_config=DataConfig(datasets_to_split=["train"] if opts.workers > 1 else [], execution_options=ingest,
                                  enable_shard_locality=False),
    )
    trainer.mlflow_run_id = mlflow_run_id
    return trainer


def ingest_options():
    """Ray Data's options for a run's streams: the order preserved (the run's fixed example order),
    the rest as the current context has it."""
    import copy

    import ray.data

    ingest = copy.deepcopy(ray.data.DataContext.get_current().execution_options)
    ingest.preserve_order = True
    return ingest


class LocalTrainer:
    """A one-CPU-worker run in this process, with a TorchTrainer's ``fit()``: see
    :mod:`loraga_ray.training.local`."""

    def __init__(self, config: dict, datasets: dict, folder: Path, callbacks, ingest):
        self.config, self.datasets, self.folder, self.callbacks, self.ingest = config, datasets, folder, callbacks, ingest
        self.mlflow_run_id = None

    def fit(self):
        from ..training.local import run_local

        return run_local(self.config, self.datasets, self.folder, self.callbacks, self.ingest)


def needs_estimate_sample(opts: TrainOptions) -> bool:
    """Whether a run's workers use the estimate's sample: PEFT's LoRA-GA, and a head warm-up of
    an init without an artifact."""
    return opts.init == "peft-lora-ga" or bool(opts.head_warmup_steps and opts.init not in ARTIFACT_INITS)


def estimate_sample(opts: TrainOptions, plan: RunPlan):
    """The sample the init pipeline draws (init_samples training rows, seed), from the plan's table."""
    from ..data import sample_table

    return sample_table(plan.train_table, opts.init_samples, opts.seed)


def estimate_artifact(opts: TrainOptions, plan: RunPlan, dest: Path) -> InitArtifact:
    """Run the init pipeline for a lora-ga / lora-one run without --artifact; the artifact goes to ``dest``."""
    from .init import run_init

    artifact, _ = run_init(opts.init_options(out=str(dest), max_rank=artifact_max_rank(opts.init, opts.rank), task=plan.task,
                                             num_labels=plan.num_labels))
    return artifact


def fit(opts: TrainOptions) -> dict:
    """Check, (estimate the init,) train, export and record one run; returns the final metrics
    (plus ``history``, ``out``, ``mlflow_run_id``)."""
    opts.validate()
    out = Path(opts.out).expanduser().resolve()
    with output_lock(out):  # one run per folder: a second one fails at once, naming this one
        # --overwrite: the old run waits aside until this one ends well (or comes back)
        with replacing_folder(out, "training run", run_complete, opts.overwrite, opts.resume):
            return _fit(dataclasses.replace(opts, out=str(out)), out)


def run_complete(out: Path) -> bool:
    """A run that ended (finished, or stopped as asked): its metrics are written last."""
    return (Path(out) / METRICS_FILE).is_file()


def _fit(opts: TrainOptions, out: Path) -> dict:
    from .cluster import connect

    started = time.time()
    opts = dataclasses.replace(opts, tracking_uri=restore(opts.tracking_uri))  # a resumed run's, saved masked
    saved = check_out_folder(opts, out)
    if saved is not None and opts.init in ARTIFACT_INITS and opts.artifact is None and (out / INIT_ARTIFACT_DIR / "meta.json").exists():
        opts = dataclasses.replace(opts, artifact=str(out / INIT_ARTIFACT_DIR))  # the one this run estimated
    artifact = None
    if opts.init in ARTIFACT_INITS and opts.artifact:
        opts = dataclasses.replace(opts, artifact=str(Path(opts.artifact).expanduser().resolve()))
        artifact = InitArtifact.load(opts.artifact)  # read once; everything below uses this copy

    if saved is not None and opts.init in ARTIFACT_INITS:
        check_resumed_artifact(saved, artifact, out)

    # the data, the model's shapes, the artifact: no cluster yet
    plan = plan_run(opts, artifact)
    if artifact is not None:
        check_artifact_weights(opts, plan, artifact)

    # the MLflow store and the cluster must both answer before anything is written; a store the
    # user named is checked first (quick), the default one in <out> once the cluster is known to fit
    tracking_uri = opts.tracking_uri or tracking.default_tracking_uri(out)
    if opts.tracking_uri:
        tracking.open_experiment(tracking_uri, opts.experiment)
    connect(opts.address, min_cpus=local_cpus(opts))
    resources = plan_train_workers(opts)
    decision = decide_train(opts, plan.task, plan.num_labels, resources)  # refuses a run that fits nowhere
    claim(out, "training run")
    if not opts.tracking_uri:
        tracking.open_experiment(tracking_uri, opts.experiment)
    opts = dataclasses.replace(opts, tracking_uri=tracking_uri)

    estimated = False
    if opts.init in ARTIFACT_INITS and artifact is None:
        dest = out / INIT_ARTIFACT_DIR
        log.info("no --artifact: estimating the gradient init (%d samples) into %s", opts.init_samples, dest)
        artifact = estimate_artifact(opts, plan, dest)
        opts = dataclasses.replace(opts, artifact=str(dest))
        check_artifact_fits(opts, plan, artifact)
        estimated = True
    if saved is None:
        write_json(out / OPTIONS_FILE, dict(asdict(opts), artifact=None if estimated else opts.artifact,
                                            artifact_sha256=artifact_checksum(artifact, opts.artifact)))

    run_id = _mlflow_run(opts, out, tracking_uri, plan, artifact)
    trainer = build_trainer(opts, name=RAY_RUN_NAME, storage_path=str(out / RAY_DIR), mlflow_run_id=run_id,
                            plan=plan, resources=resources, artifact=artifact, decision=decision)
    log.info("training: init %s, %d steps of %d examples on %d worker(s) (%s, %s, %s base%s), eval on %s; "
             "checkpoints in %s", opts.init, plan.total_steps, opts.batch_size, opts.workers,
             "CUDA" if resources.cuda else "CPU", decision.strategy, decision.dtype,
             ", activation checkpointing" if opts.activation_checkpointing else "", plan.eval_source, out / RAY_DIR)
    try:
        with train_environment(opts):
            result = trainer.fit()
    except BaseException as e:
        tracking.set_status(tracking_uri, run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        if isinstance(e, KeyboardInterrupt):
            raise
        from .cluster import cause_of, error_message

        from ..training.loop import STALLED_EXIT_CODE

        why = error_message(e)
        if "HealthCheck" in type(cause_of(e)).__name__ or f"exit code {STALLED_EXIT_CODE}" in str(e):
            why = (f"a Train worker was lost: it finished no step, or left Ray Train's health check unanswered, for "
                   f"--stall-timeout {opts.stall_timeout:g}s (stuck on a hung device, a data stream that never delivers "
                   "or a collective waiting for a lost rank; stopped; or out of memory: its log says which), and "
                   "--max-failures allowed no restart")
        raise RuntimeError(f"training failed: {why}\nFix the cause, then continue with --resume --out "
                           f"{out} (from the last checkpoint, if any).") from e
    return write_outputs(opts, result, out, run_id, tracking_uri, started)


def artifact_checksum(artifact: InitArtifact | None, folder: str | None) -> str | None:
    """The sha256 of the artifact's factors (recorded in format 2, computed for format 1)."""
    if artifact is None:
        return None
    from ..core.artifact import FACTORS_FILE, file_sha256

    return artifact.meta.get("factors_sha256") or (file_sha256(Path(folder) / FACTORS_FILE) if folder else None)


def check_resumed_artifact(saved: dict, artifact: InitArtifact | None, out: Path) -> None:
    """A resumed lora-ga run continues from the init it started with, or not at all: never from
    a new estimate (another init), nor from an artifact that changed since."""
    where = saved.get("artifact") or str(out / INIT_ARTIFACT_DIR)
    if artifact is None:
        raise ValueError(
            f"--resume: the init artifact this run started from ({where}) is missing. A resumed run never estimates "
            "a new one (its checkpoints belong to that init): put the artifact back, or start a new run in another --out."
        )
    want, got = saved.get("artifact_sha256"), artifact_checksum(artifact, where)
    if want and got != want:
        raise ValueError(
            f"--resume: the init artifact at {where} changed since this run started (factors sha256 {str(got)[:12]}, "
            f"the run recorded {want[:12]}); its checkpoints belong to the other one. Put that artifact back, or start "
            "a new run in another --out."
        )


def _mlflow_run(opts: TrainOptions, out: Path, tracking_uri: str, plan: RunPlan, artifact: InitArtifact | None) -> str:
    """The run's MLflow run: the one a stopped run logged to (set RUNNING again), else a new one
    with the init artifact recorded."""
    record = read_run_record(out) if opts.resume else {}
    run_id = record.get("mlflow_run_id") if record.get("tracking_uri") == redact(tracking_uri) else None
    if run_id is not None:
        tracking.set_status(tracking_uri, run_id, "RUNNING")
        return run_id
    run_id = create_mlflow_run(opts, tracking_uri, plan)
    write_json(out / RUN_FILE, {"mlflow_run_id": run_id, "tracking_uri": tracking_uri})
    if artifact is not None:
        import shutil
        import tempfile

        with tempfile.TemporaryDirectory(prefix=".plots-", dir=out) as plots:
            png = tracking.log_init_artifact(tracking_uri, run_id, artifact, plots)
            shutil.copy2(png, out / SINGULAR_VALUES_FILE)
    return run_id
