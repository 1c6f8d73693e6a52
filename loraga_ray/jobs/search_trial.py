"""One trial of a search: a Ray Train run driven from a Ray Tune function (or, for a single-worker
CPU trial, the same training loop inside that function: :mod:`loraga_ray.training.local`), its
reports forwarded to Tune, its outputs in ``<out>/trials/<trial id>``, its MLflow run a child of
the search's."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from ..core.files import write_json
from ..options import ARTIFACT_INITS, TrainOptions, from_dict
from .search_results import METRIC, TRIALS_DIR

TRIAL_RUN_FILE = "mlflow_run.json"
ASHA_TIME = "asha_step"  # "step" in every report Tune gets except the final one


def tune_result(report: dict) -> dict | None:
    """What Tune gets of a run's report: only evaluation reports (and the final one) — ASHA needs
    only those, and every result Tune takes holds up the Train controller, so per-step reports
    stay out of Tune (they still reach MLflow). The final report's ``done``, which Tune would take
    as its own stop signal and tear the trial down while the run is still saving, becomes
    ``train_done``. None: nothing for Tune."""
    if METRIC not in report and not report.get("done"):
        return None
    first = {k: v for k, v in report.items() if k != "step_metrics"}  # per-step rows go to MLflow only
    if "done" in first:
        first["train_done"] = bool(first.pop("done"))
    if not first.get("train_done"):
        # ASHA's clock. The final report carries none, so ASHA never stops a trial on it: a rung at
        # the last step would otherwise kill the trial before it exports its adapter.
        first[ASHA_TIME] = first.get("step")
    return first


def _report_to_tune():
    """A Ray Train callback that forwards :func:`tune_result` of each report to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ReportToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            first = tune_result(metrics[0]) if metrics else None
            if first is not None:
                super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return ReportToTune()


class _ReportHere:
    """The same for a trial that trains in its own process: :func:`tune_result` to ``tune.report``."""

    def after_report(self, run_context, metrics, checkpoint):
        from ray import tune

        first = tune_result(metrics[0]) if metrics else None
        if first is not None:
            if checkpoint is not None:
                first["checkpoint_path"] = checkpoint.path  # as Train's callback adds it
            tune.report(first)


def run_trial(config: dict, setup: dict) -> None:
    """The Tune trainable: base options + the trial's config -> TrainOptions -> one Ray Train run
    (or the loop here, ``setup["in_process"]``), then its outputs (adapter, metrics.json, loss curve) in ``<out>/trials/<trial id>``.

    The trial's MLflow run (a child of the search's run) is created once and its id kept in the
    trial's folder, so a trial restored by --resume goes on logging into the same run, and it
    resumes from its last checkpoint (its Ray Train run, named after the trial, or the in-process
    checkpoints under the same name)."""
    import time

    from ray import tune

    from .. import tracking
    from .run_plan import plan_run
    from .train import build_trainer, create_mlflow_run, train_environment
    from .run_folder import write_outputs

    started = time.time()
    # Ray Train settings of the search's driver (RAY_TRAIN_*, e.g. the controller's poll interval):
    # Train propagates them from the process that calls fit(), which here is this trial
    os.environ.update(setup.get("env", {}))
    trial_id = tune.get_context().get_trial_id()
    trial_out = Path(setup["out"]) / TRIALS_DIR / trial_id
    values = dict(setup["base"])
    values.update(config)
    values.update(
        out=str(trial_out),
        artifact=setup["artifact"] if values.get("init") in ARTIFACT_INITS else None,
        tracking_uri=setup["tracking_uri"],
        parent_run_id=setup["parent_run_id"],
        run_name=trial_id,
        resume=False,
    )
    opts = from_dict(TrainOptions, values)
    artifact = setup["artifact_copy"] if opts.init in ARTIFACT_INITS else None
    plan = plan_run(opts, artifact)
    trial_out.mkdir(parents=True, exist_ok=True)
    run_file = trial_out / TRIAL_RUN_FILE
    if run_file.is_file():
        run_id = json.loads(run_file.read_text())["mlflow_run_id"]
        tracking.set_status(opts.tracking_uri, run_id, "RUNNING")
    else:
        run_id = create_mlflow_run(opts, opts.tracking_uri, plan)
        write_json(run_file, {"mlflow_run_id": run_id, "tracking_uri": opts.tracking_uri, "trial_id": trial_id,
                               "artifact": opts.artifact})
    in_process = bool(setup.get("in_process"))
    trainer = build_trainer(opts, name=trial_id, storage_path=setup["train_storage"],
                            callbacks=[_ReportHere() if in_process else _report_to_tune()],
                            mlflow_run_id=run_id, plan=plan, artifact=artifact, in_process=in_process)
    try:
        with train_environment(opts):
            result = trainer.fit()
    except SystemExit:  # Tune stopped the trial (ASHA) inside its report: no failure; close_trial_runs marks it KILLED
        raise
    except BaseException:
        with contextlib.suppress(Exception):
            tracking.set_status(opts.tracking_uri, run_id, "FAILED")
        raise
    write_outputs(opts, result, trial_out, run_id, opts.tracking_uri, started)


def close_trial_runs(out: Path, tracking_uri: str) -> None:
    """Trials that ASHA stopped (or an interrupt killed) never end their MLflow run: mark those
    still RUNNING as KILLED. A resumed trial sets its run to RUNNING again."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    for run_file in sorted((out / TRIALS_DIR).glob(f"*/{TRIAL_RUN_FILE}")):
        run_id = json.loads(run_file.read_text())["mlflow_run_id"]
        with contextlib.suppress(Exception):
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status="KILLED")
