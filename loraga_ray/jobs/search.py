"""``loraga-ray tune``: a Ray Tune search over rank, alpha, gamma, lr, direction, scale and init,
all trials sharing ONE gradient estimate.

The gradient estimate is the expensive part of LoRA-GA and does not depend on the rank, alpha,
gamma, direction, scale or learning rate. So the search runs the init pipeline once, with
k = 2 x the largest rank in the space, saves the artifact under ``<out>/init`` and every lora-ga (or lora-one)
trial applies that artifact (``TrainOptions.artifact``). Each trial is a Ray Train run
(:func:`loraga_ray.jobs.train.build_trainer`) driven from a Tune function, or, for a trial of one
CPU worker (``--trial-runner auto``, the default), the same training loop inside that function
(:mod:`loraga_ray.training.local`: no Train controller and worker to start per trial); ASHA stops
poor trials early on ``eval_loss``.

Output folder::

    <out>/search.json        what was searched (space, base options, artifact, MLflow parent run)
    <out>/estimates.jsonl    one line per gradient estimate this search ran (1, or 0 with --artifact)
    <out>/init/              the shared init artifact
    <out>/<name>/            the Ray Tune experiment (Tuner.restore / --resume read it)
    <out>/train/             the trials' checkpoints (Ray Train runs, or checkpoint_<step> of in-process
                             trials); <out>/trials/<trial id>/ their outputs
    <out>/trials.csv, trials.md, best.json, eval_loss.png   the results
    <out>/mlflow.db          the MLflow store (unless --tracking-uri): a parent run, one child per trial
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..core.artifact import InitArtifact
from ..core.files import output_lock, read_marker, write_json
from ..redact import redact_obj, restore
from ..options import (ARTIFACT_INITS, SearchError, SearchOptions, TrainOptions, artifact_max_rank, from_dict,
                       gradient_directions)
from ..spaces import KEYS, SearchSpace, SpaceError, load_space, parse_space
from .search_results import METRIC, best_record, collect_rows, log_results, pick_best, write_results
from .run_folder import claim, replacing_folder
from .search_trial import ASHA_TIME, close_trial_runs, run_trial

log = logging.getLogger(__name__)

__all__ = ["SearchError", "SearchOptions", "SearchResult", "search", "plan_search", "count_estimates", "read_state"]

SEARCH_FILE = "search.json"
ESTIMATES_FILE = "estimates.jsonl"
INIT_DIR = "init"
TRAIN_DIR = "train"


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


@dataclass
class SharedArtifact:
    """The one init artifact of a search: its folder and the copy read from it (once)."""

    path: str
    loaded: InitArtifact


# ---------------------------------------------------------------------------------------------
# Checks that run before anything expensive
# ---------------------------------------------------------------------------------------------


def _check_space_values(space: SearchSpace, base) -> None:
    """Values that the space leaves to the base options must be valid too (e.g. --init)."""
    for key in KEYS:
        if key in space.params or not hasattr(base, key) or getattr(base, key) is None:
            continue  # None: the option's own default (--gamma per method, --head-lr = --lr)
        try:
            parse_space({key: getattr(base, key)}, source="(command-line options)")
        except SpaceError as e:
            raise SearchError(str(e)) from None


def _probe_options(base, space: SearchSpace):
    """Base options with the space's first values, a rank of 1 and no artifact: enough for
    plan_run to check the data and the model before anything is loaded."""
    values = {k: space.values(k, getattr(base, k))[0] for k in space.params if space.params[k].discrete_values()}
    values.update(rank=1, artifact=None)
    return dataclasses.replace(base, **values)


def check_ranks(space: SearchSpace, base: TrainOptions, shapes: dict[str, tuple[int, int]],
                artifact: InitArtifact | None) -> int:
    """The largest rank of the space; raises, naming the key, if a layer or the given artifact
    cannot take it."""
    from ..core.targets import TargetError, check_rank_limit

    max_rank = max(space.values("rank", base.rank))
    inits = space.values("init", base.init)
    if set(inits) == {"full"}:
        return max_rank
    uses_lora_ga = bool({"lora-ga", "peft-lora-ga"} & set(inits))
    try:
        check_rank_limit(shapes, max_rank, directions=2 if uses_lora_ga else 1,
                         label=f"search space {space.source}: key 'rank': {max_rank}",
                         fix=f"Drop the larger ranks from the space or narrow --target-modules for {base.model}.")
    except TargetError as e:
        raise SearchError(str(e)) from None
    for init in (i for i in ARTIFACT_INITS if i in inits and artifact is not None):
        allowed = artifact.k // gradient_directions(init)
        if max_rank > allowed:
            raise SearchError(
                f"search space {space.source}: key 'rank': {max_rank} is above what the artifact {base.artifact} "
                f"holds for {init} (k={artifact.k} singular vectors per layer, so rank <= {allowed}). Drop the "
                f"larger ranks, or leave --artifact unset so the search estimates one with max_rank={max_rank}."
            )
    return max_rank


def uses_artifact(space: SearchSpace, base: TrainOptions) -> bool:
    """Whether any trial starts from the init artifact (lora-ga or lora-one)."""
    return any(space.may_use(init, base.init) for init in ARTIFACT_INITS)


def plan_search(base: TrainOptions, space: SearchSpace):
    """Every check that needs no cluster: options, data, the model's layer shapes (weightless),
    the ranks of the space, and a given artifact (read once: shapes, rank, then the weight
    fingerprint). Returns (train plan, largest rank, the given artifact or None)."""
    from .run_plan import check_artifact_fits, check_artifact_weights, plan_run

    for bs in space.values("batch_size", base.batch_size):
        if bs % base.workers:
            raise SearchError(
                f"search space {space.source}: key 'batch_size': {bs} is not a multiple of --workers {base.workers} "
                "(the global batch is split evenly over the workers)."
            )
    probe = _probe_options(base, space)
    probe.validate()
    plan = plan_run(probe)
    artifact = None
    if base.artifact and uses_artifact(space, base):
        artifact = InitArtifact.load(base.artifact)  # a clear error if it is no artifact
    max_rank = check_ranks(space, base, plan.shapes, artifact)
    if artifact is not None:
        init = next(i for i in ARTIFACT_INITS if space.may_use(i, base.init))
        with_artifact = dataclasses.replace(probe, init=init, rank=max_rank, artifact=base.artifact)
        check_artifact_fits(with_artifact, plan, artifact)
        check_artifact_weights(with_artifact, plan, artifact)  # the weight fingerprint: loads the base once
    return plan, max_rank, artifact


def check_cluster(base: TrainOptions, sopts: SearchOptions, plan, estimate: bool) -> None:
    """One trial's Train workers (--workers) and the gradient workers (--init-workers) must fit
    the cluster; each check raises with the numbers. Ray must be initialised."""
    import ray

    from .resources import plan_workers
    from .train import plan_train_workers

    plan_train_workers(base)
    trials_in_process(base, sopts)  # --trial-runner in-process on a GPU trial: refused before anything is written
    cpus = float(ray.cluster_resources().get("CPU", 0))
    need = sopts.max_concurrent * base.workers * base.cpus_per_worker + 1
    if need > cpus + 1e-9:
        raise SearchError(
            f"--max-concurrent {sopts.max_concurrent} trials x --workers {base.workers} x {base.cpus_per_worker:g} CPU each, "
            f"plus 1 CPU for Ray Data, needs {need:g} CPUs but the Ray cluster has {cpus:g}: the trials would hold every "
            "CPU and their data would never load. Lower --max-concurrent (or --cpus-per-worker), or add nodes."
        )
    if estimate:
        init = base.init_options(out=None, max_rank=1, task=plan.task, num_labels=plan.num_labels)
        plan_workers("gradient workers", init.workers, gpus_per_worker=init.gpus_per_worker,
                     cpus_per_worker=init.cpus_per_worker, address=init.address)


# ---------------------------------------------------------------------------------------------
# State on disk
# ---------------------------------------------------------------------------------------------


def read_state(out: str | os.PathLike) -> dict:
    path = Path(out).expanduser().resolve() / SEARCH_FILE
    if not path.is_file():
        raise SearchError(f"--resume: {path.parent} holds no search ({SEARCH_FILE} is missing); start one without --resume.")
    return json.loads(path.read_text())


def check_resume_is_ours(out: Path, state: dict) -> None:
    """--resume unpickles Ray Tune's saved experiment state, which can run code: a search folder
    is trusted like code. Only a folder this tool created is resumed: its marker holds the random
    id that search.json recorded when the search began."""
    marker_id = read_marker(out).get("search_id")
    if not marker_id or marker_id != state.get("search_id"):
        raise SearchError(
            f"--resume: {out} was not created by loraga-ray tune (its marker and search.json do not carry the same "
            "search id). Resuming unpickles Ray Tune's saved state, which can run code, so only searches this tool "
            "started are resumed; start a new search in another --out."
        )


def count_estimates(out: str | os.PathLike) -> int:
    """How many gradient estimates the search in ``out`` has run (the log has one line each)."""
    path = Path(out) / ESTIMATES_FILE
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


# ---------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------


def estimate_once(base: TrainOptions, max_rank: int, out: Path, plan) -> SharedArtifact:
    """Run the init pipeline (one gradient estimate, k = 2 * max_rank) into ``<out>/init`` and
    add a line to ``<out>/estimates.jsonl``."""
    from .init import run_init

    folder = out / INIT_DIR
    log.info("one gradient estimate for the whole search: max_rank=%d (k=%d), %d samples",
             max_rank, 2 * max_rank, base.init_samples)
    artifact, summary = run_init(base.init_options(out=str(folder), max_rank=max_rank, task=plan.task,
                                                   num_labels=plan.num_labels))
    meta = artifact.meta
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
        f.write(json.dumps(redact_obj(record), default=str) + "\n")
    return SharedArtifact(str(folder), artifact)


def _lenient_metric_checking():
    """Tune rejects a result without the scheduler's metric; a trial's final report could lack
    eval_loss (e.g. a future Train that skips the last evaluation). ASHA itself skips such results."""
    from ..envvars import environment

    return environment(TUNE_DISABLE_STRICT_METRIC_CHECKING="1")


def _parent_params(space: SearchSpace, base, sopts: SearchOptions, space_file: str | None) -> dict:
    params = {f"space.{k}": json.dumps(p.to_yaml()) for k, p in space.params.items()}
    params.update(
        model=base.model, data=base.data, space_file=space_file or "", num_samples=sopts.num_samples,
        max_concurrent=sopts.max_concurrent, grace_period=sopts.grace_period, reduction_factor=sopts.reduction_factor,
        max_steps=base.max_steps, epochs=base.epochs, batch_size=base.batch_size, eval_every=base.eval_every,
        workers=base.workers, seed=base.seed, init=base.init, search_name=sopts.name,
    )
    return {k: v for k, v in params.items() if v is not None}


def _new_or_resumed(base: TrainOptions | None, sopts: SearchOptions, out: Path):
    """(base, sopts, space, saved state) of a new search, or of the one in ``out`` (--resume)."""
    if sopts.resume:
        state = read_state(out)
        check_resume_is_ours(out, state)
        base = from_dict(TrainOptions, state["base"])
        base = dataclasses.replace(base, tracking_uri=restore(base.tracking_uri))  # saved with credentials masked
        saved = state["search"]
        for old, new in (("init_workers", "init_workers"), ("svd", "init_svd")):  # search.json of 0.1.0
            if saved.get(old) is not None and old in saved:
                base = dataclasses.replace(base, **{new: saved[old]})
        space = parse_space(state["space"], source=state.get("space_file") or str(out / SEARCH_FILE))
        saved.setdefault("trial_runner", "ray-train")  # a search from before --trial-runner: its trials' checkpoints are Train's
        keep = {f.name for f in dataclasses.fields(SearchOptions)} - {"resume", "overwrite"}
        sopts = dataclasses.replace(sopts, **{k: v for k, v in saved.items() if k in keep}, resume=True)
        return base, sopts, space, state
    if (out / SEARCH_FILE).exists():
        raise SearchError(f"{out} already holds a search; pass --resume to continue it, or choose another --out.")
    if not sopts.space:
        raise SearchError("--space is required: a YAML search space such as tune_spaces/rank.yaml.")
    return dataclasses.replace(base, out=str(out)), sopts, load_space(sopts.space), {}


def _open_store_and_cluster(base: TrainOptions, sopts: SearchOptions, plan, estimate: bool, out: Path) -> str:
    """The MLflow store and the Ray cluster must both answer before any work starts; a store the
    user named is checked first (quick), the default one in ``out`` once the cluster is known to
    fit. Returns the tracking URI."""
    from .. import tracking
    from .cluster import connect
    from .train import local_cpus

    tracking_uri = base.tracking_uri or tracking.default_tracking_uri(out)
    if base.tracking_uri:
        tracking.open_experiment(tracking_uri, base.experiment)
    connect(base.address, min_cpus=local_cpus(base, sopts.max_concurrent))
    check_cluster(base, sopts, plan, estimate)
    claim(out, "search", search_id=uuid.uuid4().hex)  # a resumed search keeps its marker
    tracking.open_experiment(tracking_uri, base.experiment)
    return tracking_uri


def _save_state(out: Path, base: TrainOptions, sopts: SearchOptions, space: SearchSpace, state: dict,
                tracking_uri: str) -> dict:
    """``search.json``, with the search's MLflow parent run (created, or set RUNNING again)."""
    from .. import tracking

    parent_run_id = state.get("parent_run_id")
    if parent_run_id is None:
        parent_run_id = tracking.create_run(
            tracking_uri, base.experiment, params=_parent_params(space, base, sopts, sopts.space),
            run_name=sopts.name, tags={"loraga_ray.kind": "search"},
        )
    else:
        tracking.set_status(tracking_uri, parent_run_id, "RUNNING")
    state = {
        "base": dataclasses.asdict(base),
        "space": space.to_dict(),
        "space_file": str(space.source),
        "search": {k: v for k, v in dataclasses.asdict(sopts).items() if k != "resume"},
        "parent_run_id": parent_run_id,
        "tracking_uri": tracking_uri,
        "artifact": state.get("artifact"),
        "created": state.get("created") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "search_id": read_marker(out).get("search_id"),
    }
    write_json(out / SEARCH_FILE, state)
    return state


def _shared_artifact(base: TrainOptions, space: SearchSpace, state: dict, given: InitArtifact | None, kept: str | None,
                     max_rank: int, out: Path, plan) -> SharedArtifact:
    """The search's one artifact: the given one, the one a resumed search made, or a new estimate
    (recorded in MLflow and ``estimates.jsonl``); its folder goes into ``search.json``."""
    from .. import tracking

    if given is not None:
        artifact = SharedArtifact(base.artifact, given)
    elif kept is not None:
        artifact = SharedArtifact(kept, InitArtifact.load(kept))
    else:  # enough singular triplets for every artifact init of the space at its largest rank
        needed = max(artifact_max_rank(i, max_rank) for i in ARTIFACT_INITS if space.may_use(i, base.init))
        artifact = estimate_once(base, needed, out, plan)
        tracking.log_init_artifact(state["tracking_uri"], state["parent_run_id"], artifact.loaded, out)
    state["artifact"] = artifact.path
    write_json(out / SEARCH_FILE, state)
    return artifact


def search(base: TrainOptions | None, sopts: SearchOptions, *, out: str | os.PathLike | None = None,
           callbacks: Sequence = ()) -> SearchResult:
    """Run a search, or with ``sopts.resume`` continue the one in ``out``.

    ``base`` is a :class:`~loraga_ray.options.TrainOptions` whose ``out`` is the search's output
    folder; each trial's config (the space's keys) overrides its fields. When resuming, ``base``
    may be None: the options saved in ``<out>/search.json`` are used. ``callbacks`` are extra
    Ray Tune callbacks (``ray.tune.Callback``)."""
    if out is None:
        if base is None:
            raise SearchError("search() needs the output folder: base.out or out=.")
        out = base.out
    out = Path(out).expanduser().resolve()
    with output_lock(out):  # one search per folder: a second one fails at once, naming this one
        # --overwrite: the old search waits aside until this one ends well (or comes back)
        with replacing_folder(out, "search", search_complete, sopts.overwrite, sopts.resume):
            result = _search(base, sopts, out, callbacks)
            if sopts.overwrite and result.interrupted:
                raise KeyboardInterrupt(f"the search was interrupted; the search it was replacing is back in {out}")
            return result


def search_complete(out: Path) -> bool:
    """A search that ended: its best trial's record is written last."""
    return (Path(out) / "best.json").is_file()


def _search(base: TrainOptions | None, sopts: SearchOptions, out: Path, callbacks: Sequence) -> SearchResult:
    from .. import tracking
    from .run_folder import check_ours

    check_ours(out, "search")
    base, sopts, space, state = _new_or_resumed(base, sopts, out)
    sopts.validate(base)
    if base.max_steps is not None and base.eval_every >= base.max_steps:
        log.warning("--eval-every %d >= --max-steps %d: trials evaluate only at the end, so ASHA cannot stop any early.",
                    base.eval_every, base.max_steps)
    _check_space_values(space, base)
    if base.artifact:
        base = dataclasses.replace(base, artifact=str(Path(base.artifact).expanduser().resolve()))

    # data, model shapes, ranks, a given artifact: no weights, no cluster yet
    plan, max_rank, given_artifact = plan_search(base, space)
    uses_lora_ga = uses_artifact(space, base)
    kept = state.get("artifact") if state.get("artifact") and (Path(state["artifact"]) / "meta.json").is_file() else None
    estimate = uses_lora_ga and not base.artifact and kept is None

    tracking_uri = _open_store_and_cluster(base, sopts, plan, estimate, out)
    base = dataclasses.replace(base, tracking_uri=tracking_uri)
    # auto resolved once, and saved so: a resumed search's trials keep their runner (and checkpoints)
    sopts = dataclasses.replace(sopts, trial_runner="in-process" if trials_in_process(base, sopts) else "ray-train")
    state = _save_state(out, base, sopts, space, state, tracking_uri)
    parent_run_id = state["parent_run_id"]

    status = "FAILED"
    try:
        artifact = _shared_artifact(base, space, state, given_artifact, kept, max_rank, out, plan) if uses_lora_ga else None
        if artifact is None:
            log.info("no trial of this space uses lora-ga or lora-one: no gradient estimate needed")

        # the longest trial (with --epochs the length depends on the batch size)
        total_steps = plan.total_steps if base.epochs is None or "batch_size" not in space.params else 10**9
        grid, statuses = _run_tuner(base, sopts, space, out, artifact, parent_run_id, tracking_uri, callbacks, total_steps)
        # interrupted: a trial left unfinished, or trials the search had not created yet
        expected = space.grid_size() * sopts.num_samples
        interrupted = len(statuses) < expected or any(st not in ("TERMINATED", "ERROR") for st in statuses.values())
        close_trial_runs(out, tracking_uri)

        rows = collect_rows(grid, space, base, statuses, out)
        best = pick_best(rows)
        files = write_results(rows, best, space, base, sopts, out)
        log_results(tracking_uri, parent_run_id, rows, best, files)
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
        best=best_record(best, space, base), parent_run_id=parent_run_id, tracking_uri=tracking_uri,
        artifact=artifact.path if artifact is not None else None, gradient_estimates=count_estimates(out),
        interrupted=interrupted, files=files,
    )


def trials_in_process(base: TrainOptions, sopts: SearchOptions) -> bool:
    """Whether trials train inside their Tune trial (:mod:`loraga_ray.training.local`):
    ``--trial-runner in-process``, or ``auto`` for single-worker trials on CPU. Ray must be up."""
    if sopts.trial_runner == "ray-train":
        return False
    from .train import plan_train_workers

    cuda = plan_train_workers(base).cuda
    if sopts.trial_runner == "in-process":
        if cuda:
            raise SearchError("--trial-runner in-process trains on CPU only, and these trials would get a GPU (--device). "
                              "Use --trial-runner ray-train (or auto), or --device cpu.")
        return True
    return base.workers == 1 and not cuda


def _run_tuner(base, sopts, space, out, artifact: SharedArtifact | None, parent_run_id, tracking_uri, callbacks, total_steps: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from .train import max_failures

    setup = {
        "base": dataclasses.asdict(base),
        "out": str(out),
        "artifact": artifact.path if artifact is not None else None,
        "artifact_copy": artifact.loaded if artifact is not None else None,
        "tracking_uri": tracking_uri,
        "parent_run_id": parent_run_id,
        "train_storage": str(out / TRAIN_DIR),
        "env": {k: v for k, v in os.environ.items() if k.startswith("RAY_TRAIN_")},
    }
    setup["in_process"] = in_process = sopts.trial_runner == "in-process"  # resolved in _search
    # an in-process trial holds its worker's CPUs itself (a Ray Train trial's worker reserves them)
    trial_cpus = sopts.trial_cpus + (base.cpus_per_worker if in_process else 0.0)
    log.info("trials train %s", "in their Tune trial's process (one CPU worker each; --trial-runner)" if in_process
             else "as Ray Train runs")
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"cpu": trial_cpus})
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
                run_config=tune.RunConfig(name=sopts.name, storage_path=str(out), callbacks=list(callbacks),
                                          # an in-process trial restarts (from its last checkpoint) as a
                                          # lost Ray Train worker would
                                          failure_config=tune.FailureConfig(max_failures=max_failures(base) if in_process else 0)),
            )
        grid = tuner.fit()
    # Trial statuses as saved on disk: after an interrupt (Ctrl+C) Tune saves the experiment with
    # the running trials RUNNING, then stops them, so in memory they would look TERMINATED.
    saved = tune.ExperimentAnalysis(str(experiment_path))
    statuses = {t.trial_id: t.status for t in saved.trials}
    return grid, statuses
