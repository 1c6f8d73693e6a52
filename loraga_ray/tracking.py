"""MLflow helpers: where runs go, checking that the store opens, runs with parents, metrics
from Ray Train reports, and the init artifact's record.

Every ``loraga-ray train`` run is one MLflow run. By default the runs go to a SQLite file in the
output folder (``sqlite:///<out>/mlflow.db``; MLflow >= 3.13 refuses the plain file store) with
their artifacts beside it in ``<out>/mlartifacts``; ``--tracking-uri`` points at a server instead.
Look at a local store with::

    mlflow ui --backend-store-uri sqlite:///<out>/mlflow.db --host 127.0.0.1 --port 5000
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

try:  # Ray is a dependency, but this module must import without it for the pure helpers
    from ray.train import UserCallback as _UserCallback
except Exception:  # pragma: no cover
    _UserCallback = object

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be used (bad URI, server down, unknown parent run...)."""


def default_tracking_uri(out: str | os.PathLike) -> str:
    """``sqlite:///<absolute out>/mlflow.db``: the store of a run that names no server."""
    return "sqlite:///" + str(Path(out).expanduser().resolve() / "mlflow.db")  # sqlite:////abs/path: 4 slashes


def forget_open_stores(folder: str | os.PathLike) -> None:
    """Drop the MLflow stores and database engines this process keeps open for SQLite files under
    ``folder`` (MLflow caches them per URI). Needed when such a file was moved away under the same
    path (``--overwrite`` moves the old run, its mlflow.db included, aside): a cached engine would
    still write to the moved file."""
    folder = Path(folder).resolve()
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        engines = SqlAlchemyStore._engine_map
        for uri in list(engines):
            path = _sqlite_path(uri)
            if path is not None and (path == folder or folder in path.parents):
                engines.pop(uri).dispose()
        _tracking_store_registry._get_store_with_resolved_uri.cache_clear()
    except Exception:  # another MLflow version: nothing cached this way
        pass


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///"):]  # sqlite:////abs/path is absolute, sqlite:///rel/path relative to the cwd
    return Path(rest) if rest.startswith("/") else Path(rest).resolve()


def default_artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store go into ``mlartifacts`` beside the database file (MLflow would
    otherwise put them in ``./mlruns`` of whatever directory the process runs in). Servers and
    other stores decide for themselves (None)."""
    db = _sqlite_path(uri)
    return (db.parent / "mlartifacts").as_uri() if db is not None else None


def _quick_http():
    """Fail fast while probing a server: MLflow's defaults retry for minutes."""
    from .envvars import environment

    return environment(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")


def open_experiment(uri: str, experiment: str = "loraga-ray"):
    """Open the tracking store at ``uri`` and get (or create) ``experiment``.

    Returns ``(MlflowClient, experiment_id)``. Raises :class:`TrackingError` naming the URI and a
    fix when the store cannot be opened: this is the early check before any training starts.
    """
    from mlflow.tracking import MlflowClient

    if not uri or not isinstance(uri, str):
        raise TrackingError(f"tracking URI {uri!r} is empty; pass e.g. sqlite:///path/mlflow.db or http://127.0.0.1:5000.")
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    db = _sqlite_path(uri)
    if db is not None:
        if not db.parent.is_dir():
            raise TrackingError(
                f"cannot open the MLflow store {uri}: the folder {db.parent} does not exist. "
                "Create it first, or leave --tracking-uri unset to use <out>/mlflow.db."
            )
    elif scheme not in ("http", "https", "databricks", "postgresql", "mysql", "mssql", "sqlite") and not scheme.startswith(("postgresql+", "mysql+", "mssql+")):
        raise TrackingError(
            f"tracking URI {uri!r} is not one this tool supports: use sqlite:///<path>/mlflow.db "
            "(a local file; MLflow >= 3.13 refuses the plain file store), http(s)://host:port of an "
            "MLflow tracking server, or a database URL (postgresql://...)."
        )
    try:
        with _quick_http():
            client = MlflowClient(tracking_uri=uri)
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                exp_id = client.create_experiment(experiment, artifact_location=default_artifact_location(uri))
            else:
                if exp.lifecycle_stage == "deleted":
                    raise TrackingError(
                        f"experiment {experiment!r} in {uri} is deleted; restore it (mlflow experiments "
                        "restore) or pass another --experiment."
                    )
                exp_id = exp.experiment_id
    except TrackingError:
        raise
    except Exception as e:
        raise TrackingError(
            f"cannot open the MLflow tracking store {uri!r}: {type(e).__name__}: {str(e)[:300]}. "
            "Check that the server is running and reachable (mlflow server --host 127.0.0.1 --port 5000), "
            "or leave --tracking-uri unset to log to <out>/mlflow.db."
        ) from e
    return client, exp_id


def param_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        v = ",".join(str(x) for x in v)
    from .redact import redact

    s = redact(str(v))  # a data or artifact URI with a token in it: the token stays out of MLflow
    return s if len(s) <= MAX_PARAM_CHARS else s[: MAX_PARAM_CHARS - 3] + "..."


def create_run(
    uri: str,
    experiment: str,
    *,
    params: Mapping[str, Any],
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Create a run with ``params`` (and the parent tag when given); returns its id."""
    from mlflow.entities import Param, RunTag

    client, exp_id = open_experiment(uri, experiment)
    all_tags = dict(tags or {})
    if parent_run_id:
        try:
            client.get_run(parent_run_id)
        except Exception as e:
            raise TrackingError(f"parent run {parent_run_id!r} does not exist in {uri}: {str(e)[:200]}") from e
        all_tags[PARENT_TAG] = parent_run_id
    from .redact import redact_obj

    all_tags = redact_obj(all_tags)
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    items = [Param(k, param_value(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
        client.log_batch(run_id, params=items[i : i + 100])
    if all_tags:
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in all_tags.items()])
    return run_id


def numeric_metrics(metrics: Mapping[str, Any], skip: Iterable[str] = ("step",)) -> dict[str, float]:
    """The entries of a report that MLflow can store as metrics (finite numbers, bools excluded)."""
    out = {}
    for k, v in metrics.items():
        if k in skip or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[k] = float(v)
    return out


def log_metrics(client, run_id: str, metrics: Mapping[str, float], step: int, timestamp_ms: int | None = None) -> None:
    from mlflow.entities import Metric

    ts = timestamp_ms or int(time.time() * 1000)
    items = [Metric(k, v, ts, int(step)) for k, v in metrics.items()]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


class MlflowReportCallback(_UserCallback):
    """Ray Train callback: rank 0's reports become MLflow metrics, one row per training step.

    A report carries ``step_metrics``, the per-step metrics since the previous report (reports
    are batched so they do not throttle training); each row is logged at its own ``step``. A
    report without it is logged as one row at its ``step``.

    Each step is logged once: after the workers restart from a checkpoint (a lost worker, or
    ``--resume``), the steps they run again are skipped (the run already holds them, and a
    restarted run computes the same values).

    It runs in the Ray Train controller, which Ray places on the driver's node, so a local SQLite
    store is reachable from it even when the workers run on other nodes. A failing store is
    logged as a warning and never stops training (the metrics also stay in the checkpoints)."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client = None
        self._warned = False
        self._logged_up_to = None  # the last step the MLflow run holds (read from it once)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    def after_report(self, run_context, metrics, checkpoint):
        from mlflow.entities import Metric

        if not metrics:
            return
        report = metrics[0]
        rows = report.get("step_metrics") or [report]
        ts = int(time.time() * 1000)
        try:
            if self._client is None:
                from mlflow.tracking import MlflowClient

                self._client = MlflowClient(tracking_uri=self.tracking_uri)
            if self._logged_up_to is None:
                history = self._client.get_metric_history(self.run_id, "train_loss")
                self._logged_up_to = max((m.step for m in history), default=0)
            rows = [row for row in rows if int(row.get("step", 0)) > self._logged_up_to]
            if not rows:
                return
            self._logged_up_to = max(int(row.get("step", 0)) for row in rows)
            items = [Metric(k, v, ts, int(row.get("step", 0))) for row in rows for k, v in numeric_metrics(row).items()]
            for i in range(0, len(items), 1000):
                self._client.log_batch(self.run_id, metrics=items[i : i + 1000])
        except Exception as e:  # keep training
            if not self._warned:
                log.warning("could not log metrics to MLflow at %s: %s", self.tracking_uri, e)
                self._warned = True


def set_status(uri: str, run_id: str, status: str) -> None:
    """FINISHED, FAILED, KILLED or RUNNING (on resume)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status=status)


def log_artifacts(uri: str, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
    """A file or a folder into the run's artifacts (under ``artifact_path``)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    path = Path(path)
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


def log_init_artifact(uri: str, run_id: str, artifact, plot_dir: str | os.PathLike) -> Path:
    """Record the LoRA-GA init: its settings as ``init_*`` params, its timings as ``init_*_s``
    metrics, and its meta.json plus a PNG of the top singular values per layer as artifacts.
    ``artifact`` is the loaded :class:`~loraga_ray.core.artifact.InitArtifact` (or its folder);
    the PNG is written to ``plot_dir`` and its path returned."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from .core.artifact import META_FILE, InitArtifact
    from .plots import plot_singular_values

    art = artifact if isinstance(artifact, InitArtifact) else InitArtifact.load(artifact)
    meta = art.meta
    client = MlflowClient(tracking_uri=uri)
    existing = client.get_run(run_id).data.params
    params = {
        "init_num_examples": meta.get("num_examples"),
        "init_num_targets": meta.get("num_targets"),
        "init_k": meta.get("k"),
        "init_seed": meta.get("seed"),
        "init_svd": (meta.get("svd") or {}).get("method"),
        "init_workers": meta.get("workers"),
        "init_fingerprint": str(meta.get("fingerprint"))[:16],
    }
    new = [Param(k, param_value(v)) for k, v in params.items() if k not in existing]
    if new:
        client.log_batch(run_id, params=new)
    timings = {f"init_{k}" if not k.startswith("init_") else k: v for k, v in (meta.get("timings") or {}).items()}
    timings = numeric_metrics(timings)
    if timings:
        log_metrics(client, run_id, timings, step=0)
    client.log_dict(run_id, meta, f"init/{META_FILE}")
    png = Path(plot_dir) / "singular_values.png"
    plot_singular_values(art.singular_values(), png, title=f"gradient singular values ({meta.get('base_model')})")
    client.log_artifact(run_id, str(png), "init")
    return png


def read_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of one metric, in step order: handy for tests and notebooks."""
    from mlflow.tracking import MlflowClient

    hist = MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in hist)
