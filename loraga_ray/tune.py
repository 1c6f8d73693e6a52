"""``loraga-ray tune``: a Ray Tune search over rank, alpha, gamma, lr, direction, scale and init,
all trials sharing ONE gradient estimate.

The gradient estimate is the expensive part of LoRA-GA and does not depend on the rank, alpha,
gamma, direction, scale or learning rate. So the search runs the init pipeline once, with
k = 2 x the largest rank in the space, saves the artifact under ``<out>/init`` and every lora-ga
trial applies that artifact (``TrainOptions.artifact``). Each trial is a Ray Train run
(:func:`loraga_ray.train.build_trainer`) driven from a Tune function; ASHA stops poor trials
early on ``eval_loss``.

Output folder::

    <out>/search.json        what was searched (space, base options, artifact, MLflow parent run)
    <out>/estimates.jsonl    one line per gradient estimate this search ran (1, or 0 with --artifact)
    <out>/init/              the shared init artifact
    <out>/<name>/            the Ray Tune experiment (Tuner.restore / --resume read it)
    <out>/train/             the Ray Train runs of the trials; <out>/trials/<trial id>/ their outputs
    <out>/trials.csv, trials.md, best.json, eval_loss.png   the results
    <out>/mlflow.db          the MLflow store (unless --tracking-uri): a parent run, one child per trial
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime as _dt
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .spaces import KEYS, SearchSpace, SpaceError, load_space, parse_space

log = logging.getLogger(__name__)

SEARCH_FILE = "search.json"
ESTIMATES_FILE = "estimates.jsonl"
INIT_DIR = "init"
TRAIN_DIR = "train"
TRIALS_DIR = "trials"
TRIAL_RUN_FILE = "mlflow_run.json"
METRIC = "eval_loss"
ASHA_TIME = "asha_step"  # "step" in every report Tune gets except the final one
SCORE_KEYS = ("eval_accuracy", "eval_exact_match")


class SearchError(ValueError):
    """A search that cannot start (or resume) as asked."""


@dataclass
class SearchOptions:
    """How to search; the training options themselves are a :class:`loraga_ray.train.TrainOptions`.

    ``grace_period``: ASHA's minimum number of steps before a trial may be stopped (default: two
    evaluations, ``2 * eval_every``). ``init_workers``: gradient workers for the shared estimate
    (default: the training ``workers``).
    """

    space: str | None = None
    num_samples: int = 1
    max_concurrent: int = 1
    grace_period: int | None = None
    reduction_factor: int = 2
    name: str = "search"
    resume: bool = False
    init_workers: int | None = None
    svd: str = "randomized"
    trial_cpus: float = 0.1


@dataclass
class SearchResult:
    out: Path
    experiment_path: str
    rows: list[dict]
    best: dict | None
    parent_run_id: str
    tracking_uri: str
    artifact: str | None
    gradient_estimates: int
    interrupted: bool
    files: dict[str, Path] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Checks that run before anything expensive
# ---------------------------------------------------------------------------------------------


def _check_search_options(base, sopts: SearchOptions) -> None:
    for name in ("num_samples", "max_concurrent", "reduction_factor"):
        value = getattr(sopts, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SearchError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}.")
    if sopts.reduction_factor < 2:
        raise SearchError(f"--reduction-factor must be >= 2 (ASHA keeps 1/factor of the trials at each rung), got {sopts.reduction_factor}.")
    if not sopts.name or "/" in sopts.name or sopts.name.startswith("."):
        raise SearchError(f"--name {sopts.name!r} must be a plain folder name.")
    if base.max_steps is None and base.epochs is None:
        raise SearchError("set --max-steps (or --epochs): ASHA needs a training length.")
    if sopts.grace_period is not None:
        if sopts.grace_period < 1:
            raise SearchError(f"--grace-period must be a positive number of steps, got {sopts.grace_period}.")
        if base.max_steps is not None and sopts.grace_period > base.max_steps:
            raise SearchError(f"--grace-period {sopts.grace_period} is longer than --max-steps {base.max_steps}; ASHA could never stop a trial.")
    if base.eval_every is None or base.eval_every < 1:
        raise SearchError("--eval-every must be a positive number of steps: the search ranks trials by eval_loss.")
    if base.max_steps is not None and base.eval_every >= base.max_steps:
        log.warning("--eval-every %d >= --max-steps %d: trials evaluate only at the end, so ASHA cannot stop any early.",
                    base.eval_every, base.max_steps)


def _check_space_values(space: SearchSpace, base) -> None:
    """Values that the space leaves to the base options must be valid too (e.g. --init)."""
    for key in KEYS:
        if key in space.params or not hasattr(base, key):
            continue
        try:
            parse_space({key: getattr(base, key)}, source="(command-line options)")
        except SpaceError as e:
            raise SearchError(str(e)) from None


def _probe_options(base, space: SearchSpace):
    """Base options with the space's first values, a rank of 1 and no artifact: enough for
    train.plan_run to check the data and the model before anything is loaded."""
    values = {k: space.values(k, getattr(base, k))[0] for k in space.params if space.params[k].discrete_values()}
    values.update(rank=1, artifact=None)
    return dataclasses.replace(base, **values)


def check_ranks(space: SearchSpace, base, shapes: dict[str, tuple[int, int]], artifact_meta: dict | None) -> int:
    """The largest rank of the space; raises, naming the key, if a layer or the given artifact
    cannot take it."""
    max_rank = max(space.values("rank", base.rank))
    inits = space.values("init", base.init)
    if set(inits) == {"full"}:
        return max_rank
    uses_lora_ga = "lora-ga" in inits
    name, (d_out, d_in) = min(shapes.items(), key=lambda kv: min(kv[1]))
    limit = min(d_out, d_in) // 2 if uses_lora_ga else min(d_out, d_in)
    if max_rank > limit:
        why = "LoRA-GA uses 2r gradient directions, so r <= min(d_out, d_in)/2" if uses_lora_ga else "r <= min(d_out, d_in)"
        raise SearchError(
            f"search space {space.source}: key 'rank': {max_rank} is too large for {base.model}: layer {name!r} is "
            f"{d_out}x{d_in} and {why} = {limit}. Drop the larger ranks from the space or narrow --target-modules."
        )
    if artifact_meta is not None and uses_lora_ga and max_rank > int(artifact_meta["max_rank"]):
        raise SearchError(
            f"search space {space.source}: key 'rank': {max_rank} is above what the artifact {base.artifact} holds "
            f"(k={artifact_meta['k']} singular vectors per layer, so rank <= {artifact_meta['max_rank']}). Drop the "
            f"larger ranks, or leave --artifact unset so the search estimates one with max_rank={max_rank}."
        )
    return max_rank


def plan_search(base, space: SearchSpace):
    """Every check that needs no cluster: options, data, the model's layer shapes (weightless),
    the ranks of the space, and a given artifact (shapes, rank, then the weight fingerprint).
    Returns (train plan, largest rank)."""
    from . import train
    from .artifact import InitArtifact
    from .targets import weight_shape

    for bs in space.values("batch_size", base.batch_size):
        if bs % base.workers:
            raise SearchError(
                f"search space {space.source}: key 'batch_size': {bs} is not a multiple of --workers {base.workers} "
                "(the global batch is split evenly over the workers)."
            )
    probe = _probe_options(base, space)
    train.validate_options(probe)
    plan = train.plan_run(probe)
    model = train.meta_model(plan.spec, plan.task, plan.num_labels)
    modules = dict(model.named_modules())
    shapes = {n: weight_shape(modules[n]) for n in plan.target_modules}
    artifact_meta = None
    if base.artifact and space.may_use("lora-ga", base.init):
        artifact_meta = InitArtifact.load(base.artifact).meta  # a clear error if it is no artifact
    max_rank = check_ranks(space, base, shapes, artifact_meta)
    if artifact_meta is not None:
        with_artifact = dataclasses.replace(probe, init="lora-ga", rank=max_rank, artifact=base.artifact)
        train.check_artifact_shapes(with_artifact, plan, model)
        train.check_artifact(with_artifact, plan)  # the weight fingerprint: loads the base once
    return plan, max_rank


def check_cluster(base, sopts: SearchOptions, plan, estimate: bool) -> None:
    """One trial's Train workers (--workers) and the gradient workers (--init-workers) must fit
    the cluster; each check raises with the numbers. Ray must be initialised."""
    import ray

    from . import train

    train.plan_resources(base)
    cpus = float(ray.cluster_resources().get("CPU", 0))
    need = sopts.max_concurrent * base.workers * base.cpus_per_worker + 1
    if need > cpus + 1e-9:
        raise SearchError(
            f"--max-concurrent {sopts.max_concurrent} trials x --workers {base.workers} x {base.cpus_per_worker:g} CPU each, "
            f"plus 1 CPU for Ray Data, needs {need:g} CPUs but the Ray cluster has {cpus:g}: the trials would hold every "
            "CPU and their data would never load. Lower --max-concurrent (or --cpus-per-worker), or add nodes."
        )
    if estimate:
        from . import distributed

        joined = bool(base.address or os.environ.get("RAY_ADDRESS"))
        distributed.plan_resources(_init_options(base, sopts, 1, Path("."), plan), joined)


# ---------------------------------------------------------------------------------------------
# State on disk
# ---------------------------------------------------------------------------------------------


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def read_state(out: str | os.PathLike) -> dict:
    path = Path(out).expanduser().resolve() / SEARCH_FILE
    if not path.is_file():
        raise SearchError(f"--resume: {path.parent} holds no search ({SEARCH_FILE} is missing); start one without --resume.")
    return json.loads(path.read_text())


def count_estimates(out: str | os.PathLike) -> int:
    """How many gradient estimates the search in ``out`` has run (the log has one line each)."""
    path = Path(out) / ESTIMATES_FILE
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def _train_options_from(values: dict):
    from .train import TrainOptions

    names = {f.name for f in dataclasses.fields(TrainOptions)}
    return TrainOptions(**{k: v for k, v in values.items() if k in names})


# ---------------------------------------------------------------------------------------------
# The trial: one Ray Train run, driven from a Tune function
# ---------------------------------------------------------------------------------------------


def _report_to_tune():
    """Forwards Train's evaluation reports (and its final one) to Tune: ASHA needs only those, and
    every result Tune takes holds up the Train controller, so per-step reports stay out of Tune
    (they still reach MLflow). Train's final report says ``done``, which Tune would take as its
    own stop signal and tear the trial down while Train is still saving: it becomes ``train_done``."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ReportToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if not metrics or (METRIC not in metrics[0] and not metrics[0].get("done")):
                return
            first = {k: v for k, v in metrics[0].items() if k != "step_metrics"}  # per-step rows go to MLflow only
            if "done" in first:
                first["train_done"] = bool(first.pop("done"))
            if not first.get("train_done"):
                # ASHA's clock. The final report carries none, so ASHA never stops a trial on it: a
                # rung at the last step would otherwise kill the trial before it exports its adapter.
                first[ASHA_TIME] = first.get("step")
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return ReportToTune()


def run_trial(config: dict, setup: dict) -> None:
    """The Tune trainable: base options + the trial's config -> TrainOptions -> one Ray Train run,
    then its outputs (adapter, metrics.json, loss curve) in ``<out>/trials/<trial id>``.

    The trial's MLflow run (a child of the search's run) is created once and its id kept in the
    trial's folder, so a trial restored by --resume goes on logging into the same run, and its
    Ray Train run (named after the trial) resumes from its last checkpoint."""
    import time

    from ray import tune

    from . import tracking, train

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
        artifact=setup["artifact"] if values.get("init") == "lora-ga" else None,
        tracking_uri=setup["tracking_uri"],
        parent_run_id=setup["parent_run_id"],
        run_name=trial_id,
        resume=False,
    )
    opts = _train_options_from(values)
    plan = train.plan_run(opts)
    trial_out.mkdir(parents=True, exist_ok=True)
    run_file = trial_out / TRIAL_RUN_FILE
    if run_file.is_file():
        run_id = json.loads(run_file.read_text())["mlflow_run_id"]
        tracking.set_status(opts.tracking_uri, run_id, "RUNNING")
    else:
        run_id = train.create_mlflow_run(opts, opts.tracking_uri, plan)
        _write_json(run_file, {"mlflow_run_id": run_id, "tracking_uri": opts.tracking_uri, "trial_id": trial_id,
                               "artifact": opts.artifact})
    trainer = train.build_trainer(opts, name=trial_id, storage_path=setup["train_storage"], callbacks=[_report_to_tune()],
                                  mlflow_run_id=run_id, plan=plan)
    try:
        result = trainer.fit()
    except BaseException:
        with contextlib.suppress(Exception):
            tracking.set_status(opts.tracking_uri, run_id, "FAILED")
        raise
    train.export_run(opts, result, trial_out, run_id, opts.tracking_uri, started)


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


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def _finite(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _eval_history(result, trial_dir: Path) -> list[tuple[int, float]]:
    """(step, eval_loss) of a trial: from its own metrics.json when it finished (complete), else
    from the results Tune received."""
    metrics_file = trial_dir / "metrics.json"
    if metrics_file.is_file():
        history = json.loads(metrics_file.read_text()).get("history", [])
        points = [(int(h["step"]), float(h[METRIC])) for h in history if _finite(h.get(METRIC)) is not None]
        if points:
            return points
    df = result.metrics_dataframe
    if df is None or METRIC not in df or "step" not in df:
        return []
    df = df[df[METRIC].notna()]
    return [(int(s), float(v)) for s, v in zip(df["step"], df[METRIC])]


def collect_rows(grid, space: SearchSpace, base, statuses: dict[str, str], out: Path) -> list[dict]:
    """One row per trial: status, config, final eval metrics, steps, time."""
    rows = []
    for result in grid:
        m = result.metrics or {}
        trial_id = m.get("trial_id") or next((t for t in statuses if t in Path(result.path or "").name), "?")
        history = _eval_history(result, out / TRIALS_DIR / trial_id)
        df = result.metrics_dataframe
        last_eval = {}
        if df is not None and METRIC in df:
            evals = df[df[METRIC].notna()]
            if len(evals):
                last_eval = evals.iloc[-1].to_dict()
        if result.error is not None or statuses.get(trial_id) == "ERROR":
            status = "error"
        elif m.get("train_done"):
            status = "completed"
        elif statuses.get(trial_id) == "TERMINATED":
            status = "stopped early"  # by ASHA
        else:
            status = "unfinished"
        row = {"trial_id": trial_id, "status": status}
        for key in space.params:
            row[key] = result.config.get(key)
        row["init"] = result.config.get("init", base.init)
        row["eval_loss"] = _finite(last_eval.get(METRIC))
        for key in SCORE_KEYS:
            if key in last_eval:
                row[key] = _finite(last_eval.get(key))
        row["eval_step"] = int(last_eval["step"]) if "step" in last_eval and _finite(last_eval["step"]) is not None else None
        row["best_eval_loss"] = min((v for _, v in history), default=None)
        row["train_loss"] = _finite(m.get("train_loss"))
        row["steps"] = int(m["step"]) if _finite(m.get("step")) is not None else 0
        row["time_s"] = round(float(m.get("time_total_s", 0.0)), 1)
        row["error"] = (str(result.error).strip().splitlines() or [""])[-1][:200] if result.error is not None else ""
        row["_history"] = history
        rows.append(row)
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def pick_best(rows: list[dict]) -> dict | None:
    """The trial with the lowest final eval loss (among trials that reached an evaluation)."""
    scored = [r for r in rows if r.get("eval_loss") is not None]
    return min(scored, key=lambda r: r["eval_loss"]) if scored else None


def _columns(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if not k.startswith("_") and k not in cols)
    return cols


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_tables(rows: list[dict], out: Path) -> tuple[Path, Path]:
    cols = _columns(rows)
    csv_path, md_path = out / "trials.csv", out / "trials.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(k)).replace("|", "/") for k in cols) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def plot_eval_loss(rows: list[dict], space: SearchSpace, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    best = pick_best(rows)
    for r in rows:
        if not r["_history"]:
            continue
        steps, losses = zip(*r["_history"])
        label = r["trial_id"] + " " + " ".join(f"{k}={_fmt(r.get(k))}" for k in space.params if space.params[k].kind != "const")
        is_best = best is not None and r["trial_id"] == best["trial_id"]
        ax.plot(steps, losses, marker="o", ms=3, lw=2.4 if is_best else 1.2, label=label + (" (best)" if is_best else ""))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, loc="upper right")
    else:
        ax.text(0.5, 0.5, "no trial reached an evaluation", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------


def _init_options(base, sopts: SearchOptions, max_rank: int, out: Path, plan):
    """InitOptions of the shared estimate: the trials' model, data, columns, targets, seed and
    classification head size, so the artifact fits every trial."""
    from .distributed import InitOptions

    gpus = base.gpus_per_worker
    if base.device == "cpu":
        gpus = 0.0
    values = dict(
        model=base.model, data=base.data, out=str(out / INIT_DIR), num_samples=base.init_samples,
        batch_size=base.init_batch_size, max_rank=max_rank, workers=sopts.init_workers or base.workers,
        gpus_per_worker=gpus, seed=base.seed, svd=sopts.svd, max_length=base.max_length, split="train",
        task=plan.task, target_modules=base.target_modules, address=base.address,
        num_labels=plan.num_labels if plan.task == "seq-cls" else None,
        text_column=base.text_column, label_column=base.label_column,
        prompt_column=base.prompt_column, response_column=base.response_column,
    )
    names = {f.name for f in dataclasses.fields(InitOptions)}
    return InitOptions(**{k: v for k, v in values.items() if k in names})


def estimate_once(base, sopts: SearchOptions, max_rank: int, out: Path, plan) -> str:
    """Run the init pipeline (one gradient estimate, k = 2 * max_rank) into ``<out>/init`` and
    add a line to ``<out>/estimates.jsonl``; returns the artifact folder."""
    from . import distributed
    from .artifact import InitArtifact

    folder = out / INIT_DIR
    log.info("one gradient estimate for the whole search: max_rank=%d (k=%d), %d samples",
             max_rank, 2 * max_rank, base.init_samples)
    artifact, summary = distributed.run_init(_init_options(base, sopts, max_rank, out, plan))
    if not (folder / "meta.json").is_file():
        artifact.save(folder)
    meta = InitArtifact.load(folder).meta
    record = {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "artifact": str(folder),
        "max_rank": meta["max_rank"],
        "k": meta["k"],
        "created": meta.get("created"),
        "num_examples": meta.get("num_examples"),
        "timings": meta.get("timings"),
        "workers": (summary or {}).get("workers"),
    }
    with open(out / ESTIMATES_FILE, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
    return str(folder)


@contextlib.contextmanager
def _lenient_metric_checking():
    """Tune rejects a result without the scheduler's metric; a trial's final report could lack
    eval_loss (e.g. a future Train that skips the last evaluation). ASHA itself skips such results."""
    key = "TUNE_DISABLE_STRICT_METRIC_CHECKING"
    saved = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


def _parent_params(space: SearchSpace, base, sopts: SearchOptions, space_file: str | None) -> dict:
    params = {f"space.{k}": json.dumps(p.to_yaml()) for k, p in space.params.items()}
    params.update(
        model=base.model, data=base.data, space_file=space_file or "", num_samples=sopts.num_samples,
        max_concurrent=sopts.max_concurrent, grace_period=sopts.grace_period, reduction_factor=sopts.reduction_factor,
        max_steps=base.max_steps, epochs=base.epochs, batch_size=base.batch_size, eval_every=base.eval_every,
        workers=base.workers, seed=base.seed, init=base.init, search_name=sopts.name,
    )
    return {k: v for k, v in params.items() if v is not None}


def search(base, sopts: SearchOptions, *, out: str | os.PathLike | None = None, callbacks: Sequence = ()) -> SearchResult:
    """Run a search, or with ``sopts.resume`` continue the one in ``out``.

    ``base`` is a :class:`loraga_ray.train.TrainOptions` whose ``out`` is the search's output
    folder; each trial's config (the space's keys) overrides its fields. When resuming, ``base``
    may be None: the options saved in ``<out>/search.json`` are used. ``callbacks`` are extra
    Ray Tune callbacks (``ray.tune.Callback``)."""
    from . import tracking
    from .cluster import connect

    if out is None:
        if base is None:
            raise SearchError("search() needs the output folder: base.out or out=.")
        out = base.out
    out = Path(out).expanduser().resolve()
    state: dict = {}
    if sopts.resume:
        state = read_state(out)
        base = _train_options_from(state["base"])
        space = parse_space(state["space"], source=state.get("space_file") or str(out / SEARCH_FILE))
        saved = state["search"]
        sopts = dataclasses.replace(
            sopts, **{k: saved[k] for k in ("space", "num_samples", "max_concurrent", "grace_period", "reduction_factor", "name", "init_workers", "svd", "trial_cpus") if k in saved},
            resume=True,
        )
    else:
        if (out / SEARCH_FILE).exists():
            raise SearchError(f"{out} already holds a search; pass --resume to continue it, or choose another --out.")
        if not sopts.space:
            raise SearchError("--space is required: a YAML search space such as tune_spaces/rank.yaml.")
        space = load_space(sopts.space)
        base = dataclasses.replace(base, out=str(out))
    _check_search_options(base, sopts)
    _check_space_values(space, base)
    if base.artifact:
        base = dataclasses.replace(base, artifact=str(Path(base.artifact).expanduser().resolve()))

    # data, model shapes, ranks, a given artifact: no weights, no cluster yet
    plan, max_rank = plan_search(base, space)
    uses_lora_ga = space.may_use("lora-ga", base.init)
    estimate = uses_lora_ga and not base.artifact and not (state.get("artifact") and (Path(state["artifact"]) / "meta.json").is_file())

    # the MLflow store and the Ray cluster must both answer before any work starts; a store the
    # user named is checked first (quick), the default one in <out> once the cluster is known to fit
    tracking_uri = base.tracking_uri or tracking.default_tracking_uri(out)
    if base.tracking_uri:
        tracking.open_experiment(tracking_uri, base.experiment)
    local = not (base.address or os.environ.get("RAY_ADDRESS"))
    # an embedded Ray gets logical CPUs for every concurrent trial's workers plus its Ray Data
    # tasks: with only the physical cores, Train workers hold them all and the data never flows
    per_trial = math.ceil(base.workers * base.cpus_per_worker) + 1
    connect(base.address, num_cpus=max(os.cpu_count() or 1, sopts.max_concurrent * per_trial + 1) if local else None)
    check_cluster(base, sopts, plan, estimate)
    out.mkdir(parents=True, exist_ok=True)
    tracking.open_experiment(tracking_uri, base.experiment)

    parent_run_id = state.get("parent_run_id")
    if parent_run_id is None:
        parent_run_id = tracking.create_run(
            tracking_uri, base.experiment, params=_parent_params(space, base, sopts, sopts.space),
            run_name=sopts.name, tags={"loraga_ray.kind": "search"},
        )
    else:
        tracking.set_status(tracking_uri, parent_run_id, "RUNNING")
    base = dataclasses.replace(base, tracking_uri=tracking_uri)
    state = {
        "base": dataclasses.asdict(base),
        "space": space.to_dict(),
        "space_file": str(space.source),
        "search": {k: v for k, v in dataclasses.asdict(sopts).items() if k != "resume"},
        "parent_run_id": parent_run_id,
        "tracking_uri": tracking_uri,
        "artifact": state.get("artifact"),
        "created": state.get("created") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    _write_json(out / SEARCH_FILE, state)

    status = "FAILED"
    try:
        # the one gradient estimate
        artifact = None
        if uses_lora_ga:
            if base.artifact:
                artifact = base.artifact
            elif not estimate:
                artifact = state["artifact"]  # resuming: the estimate is already there
            else:
                artifact = estimate_once(base, sopts, max_rank, out, plan)
                tracking.log_init_artifact(tracking_uri, parent_run_id, artifact, out)
            state["artifact"] = artifact
            _write_json(out / SEARCH_FILE, state)
        else:
            log.info("no trial of this space uses lora-ga: no gradient estimate needed")

        # the longest trial (with --epochs the length depends on the batch size)
        total_steps = plan.total_steps if base.epochs is None or "batch_size" not in space.params else 10**9
        grid, statuses = _run_tuner(base, sopts, space, out, artifact, parent_run_id, tracking_uri, callbacks, total_steps)
        # interrupted: a trial left unfinished, or trials the search had not created yet
        expected = space.grid_size() * sopts.num_samples
        interrupted = len(statuses) < expected or any(st not in ("TERMINATED", "ERROR") for st in statuses.values())
        close_trial_runs(out, tracking_uri)

        rows = collect_rows(grid, space, base, statuses, out)
        best = pick_best(rows)
        files = _write_results(rows, best, space, base, sopts, out)
        _log_results(tracking_uri, parent_run_id, rows, best, files)
        status = "KILLED" if interrupted else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        with contextlib.suppress(Exception):
            tracking.set_status(tracking_uri, parent_run_id, status)

    if interrupted:
        log.warning("the search was interrupted; continue it with: loraga-ray tune --out %s --resume", out)
    return SearchResult(
        out=out, experiment_path=grid.experiment_path, rows=[{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
        best=_best_record(best, space, base), parent_run_id=parent_run_id, tracking_uri=tracking_uri, artifact=artifact,
        gradient_estimates=count_estimates(out), interrupted=interrupted, files=files,
    )


def _run_tuner(base, sopts, space, out, artifact, parent_run_id, tracking_uri, callbacks, total_steps: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    setup = {
        "base": dataclasses.asdict(base),
        "out": str(out),
        "artifact": artifact,
        "tracking_uri": tracking_uri,
        "parent_run_id": parent_run_id,
        "train_storage": str(out / TRAIN_DIR),
        "env": {k: v for k, v in os.environ.items() if k.startswith("RAY_TRAIN_")},
    }
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"cpu": sopts.trial_cpus})
    experiment_path = out / sopts.name
    with _lenient_metric_checking():
        if sopts.resume and tune.Tuner.can_restore(str(experiment_path)):
            log.info("resuming the Tune experiment at %s", experiment_path)
            tuner = tune.Tuner.restore(str(experiment_path), trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            # ASHA stops any trial that reaches max_t; one step beyond the end lets a trial finish
            # (save its adapter, close its MLflow run) instead of being torn down at its last report.
            max_t = total_steps + 1
            grace = sopts.grace_period or min(2 * base.eval_every, total_steps)
            scheduler = ASHAScheduler(time_attr=ASHA_TIME, metric=METRIC, mode="min", max_t=max_t,
                                      grace_period=grace, reduction_factor=sopts.reduction_factor)
            tuner = tune.Tuner(
                trainable,
                param_space=space.param_space(),
                tune_config=tune.TuneConfig(num_samples=sopts.num_samples, max_concurrent_trials=sopts.max_concurrent, scheduler=scheduler),
                run_config=tune.RunConfig(name=sopts.name, storage_path=str(out), callbacks=list(callbacks)),
            )
        grid = tuner.fit()
    # Trial statuses as saved on disk: after an interrupt (Ctrl+C) Tune saves the experiment with
    # the running trials RUNNING, then stops them, so in memory they would look TERMINATED.
    saved = tune.ExperimentAnalysis(str(experiment_path))
    statuses = {t.trial_id: t.status for t in saved.trials}
    return grid, statuses


def _best_record(best: dict | None, space: SearchSpace, base) -> dict | None:
    if best is None:
        return None
    config = {k: best.get(k) for k in space.params}
    config.setdefault("init", best.get("init"))
    record = {
        "trial_id": best["trial_id"],
        "config": config,
        "eval_loss": best["eval_loss"],
        "steps": best["steps"],
        "time_s": best["time_s"],
        "status": best["status"],
    }
    for key in SCORE_KEYS:
        if best.get(key) is not None:
            record[key] = best[key]
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in config.items() if not isinstance(v, bool))
    if config.get("use_rslora") is False:
        flags += " --no-rslora"
    record["train_command"] = f"loraga-ray train --model {base.model} --data {base.data} {flags}".strip()
    return record


def _write_results(rows, best, space, base, sopts, out: Path) -> dict[str, Path]:
    csv_path, md_path = write_tables(rows, out)
    best_path = out / "best.json"
    _write_json(best_path, _best_record(best, space, base))
    png = plot_eval_loss(rows, space, out / "eval_loss.png", title=f"eval loss per trial: {base.model} on {base.data} ({Path(space.source).name})")
    return {"csv": csv_path, "markdown": md_path, "best": best_path, "plot": png}


def _log_results(uri: str, run_id: str, rows, best, files: dict[str, Path]) -> None:
    from mlflow.tracking import MlflowClient

    from . import tracking

    client = MlflowClient(tracking_uri=uri)
    for path in files.values():
        tracking.log_artifacts(uri, run_id, path, "search")
    metrics = {"num_trials": len(rows), "num_completed": sum(r["status"] == "completed" for r in rows)}
    if best is not None:
        metrics["best_eval_loss"] = best["eval_loss"]
        for key in SCORE_KEYS:
            if best.get(key) is not None:
                metrics[f"best_{key}"] = best[key]
        client.set_tag(run_id, "best_trial", best["trial_id"])
    tracking.log_metrics(client, run_id, metrics, step=0)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("search")
    g.add_argument("--space", help="YAML search space (tune_spaces/rank.yaml, scaling.yaml, baselines.yaml or your own)")
    g.add_argument("--out", required=True, help="output folder of the search (created; --resume continues the one there)")
    g.add_argument("--num-samples", type=int, default=1, help="samples of the space; grid values multiply (default 1)")
    g.add_argument("--max-concurrent", type=int, default=1, help="trials running at once (default 1)")
    g.add_argument("--grace-period", type=int, default=None, help="ASHA: steps before a trial may be stopped (default 2 x --eval-every)")
    g.add_argument("--reduction-factor", type=int, default=2, help="ASHA: keep 1/factor of the trials at each rung (default 2)")
    g.add_argument("--name", default="search", help="name of the Tune experiment (folder under --out)")
    g.add_argument("--resume", action="store_true", help="continue the interrupted search in --out (its saved options are used)")
    g.add_argument("--artifact", default=None, help="use this init artifact instead of estimating one (its max_rank must cover the space)")

    m = parser.add_argument_group("model and data")
    m.add_argument("--model", help="demo-minilm, demo-smollm2, a local Hugging Face folder or a .gguf file")
    m.add_argument("--data", help="demo-rotten-tomatoes, demo-arithmetic, or a local file/folder")
    m.add_argument("--task", choices=("seq-cls", "causal-lm"), default=None)
    for col in ("text", "label", "prompt", "response"):
        m.add_argument(f"--{col}-column", default=None)
    m.add_argument("--target-modules", nargs="+", default=None, help="layer names/suffixes to adapt (default: all Linears but the head)")
    m.add_argument("--max-length", type=int, default=128)

    t = parser.add_argument_group("training (values the space does not set)")
    t.add_argument("--init", default="lora-ga", help="lora-ga, lora, pissa or full (default lora-ga)")
    t.add_argument("--rank", type=int, default=8)
    t.add_argument("--alpha", type=float, default=16.0)
    t.add_argument("--gamma", type=float, default=16.0)
    t.add_argument("--direction", default="ArB2r")
    t.add_argument("--scale", default="stable")
    t.add_argument("--no-rslora", dest="use_rslora", action="store_false", help="eta = alpha/r instead of alpha/sqrt(r)")
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--max-steps", type=int, default=200)
    t.add_argument("--epochs", type=float, default=None)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--warmup-ratio", type=float, default=0.05)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--max-grad-norm", type=float, default=1.0)
    t.add_argument("--eval-every", type=int, default=50)
    t.add_argument("--eval-samples", type=int, default=None)
    t.add_argument("--seed", type=int, default=0)

    r = parser.add_argument_group("gradient estimate and cluster")
    r.add_argument("--init-samples", type=int, default=256, help="examples in the gradient estimate (default 256)")
    r.add_argument("--init-batch-size", type=int, default=8)
    r.add_argument("--init-workers", type=int, default=None, help="gradient workers (default: --workers)")
    r.add_argument("--svd", choices=("randomized", "exact"), default="randomized")
    r.add_argument("--workers", type=int, default=1, help="Ray Train workers per trial")
    r.add_argument("--gpus-per-worker", type=float, default=None, help="default: 1 when the cluster has GPUs")
    r.add_argument("--cpus-per-worker", type=float, default=1.0)
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    r.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    r.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///<out>/mlflow.db)")
    r.add_argument("--experiment", default="loraga-ray", help="MLflow experiment name")


def options_from_args(args: argparse.Namespace):
    """(TrainOptions, SearchOptions) from parsed arguments."""
    from .train import TrainOptions

    if not args.resume and (not args.model or not args.data or not args.space):
        missing = [f"--{n}" for n in ("model", "data", "space") if not getattr(args, n)]
        raise SearchError(f"{', '.join(missing)} required (only --out and --resume are needed to continue a search).")
    names = {f.name for f in dataclasses.fields(TrainOptions)}
    values = {k: v for k, v in vars(args).items() if k in names}
    if args.epochs is not None:
        values["max_steps"] = None  # --epochs decides the length
    base = None if args.resume else TrainOptions(**values)  # --resume: the options come from search.json
    sopts = SearchOptions(
        space=args.space, num_samples=args.num_samples, max_concurrent=args.max_concurrent, grace_period=args.grace_period,
        reduction_factor=args.reduction_factor, name=args.name, resume=args.resume, init_workers=args.init_workers, svd=args.svd,
    )
    return base, sopts


def run(args: argparse.Namespace) -> int:
    base, sopts = options_from_args(args)
    result = search(base, sopts, out=args.out)
    print(f"\n{len(result.rows)} trials, {result.gradient_estimates} gradient estimate(s); results in {result.out}")
    print((result.out / "trials.md").read_text())
    if result.best:
        print(f"best: trial {result.best['trial_id']} eval_loss={result.best['eval_loss']:.4f} config={result.best['config']}")
        print(f"      {result.best['train_command']}")
    print(f"MLflow: parent run {result.parent_run_id} in {result.tracking_uri}")
    if result.interrupted:
        print(f"interrupted: continue with `loraga-ray tune --out {result.out} --resume`")
        return 130
    if result.rows and all(r["status"] == "error" for r in result.rows):
        print(f"every trial failed; the errors are in {result.out / 'trials.md'} and in the Tune logs under {result.experiment_path}")
        return 1
    return 0
