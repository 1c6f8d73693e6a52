"""The LoRA-GA gradient estimate on Ray: ``loraga-ray init``.

Stages, each timed in the summary:

1. **read**: Ray Data reads the dataset (one read task per file, or the native readers for
   s3:// / gs:// URIs), the driver learns the row count of every block and draws exactly
   ``num_samples`` row indices uniformly without replacement from ``seed``, and only those rows
   are fetched. The sample is the one ``data.sample_table(data.load_split(...))`` gives.
2. **start**: N gradient workers (Ray actors, gang-scheduled in a placement group, one GPU each
   when asked) load the model. Asking for more than the cluster can give fails within seconds.
3. **gradient**: Ray Data tokenises the sample on CPU and streams it to the workers
   (``streaming_split``); each accumulates float32 per-layer sums of the summed-loss gradient and
   its example / target / token counts. Every sampled example carries its index, and the driver
   checks that each one was counted exactly once. A worker that dies mid-stream makes the whole
   stage run again on fresh workers (``max_retries`` times), or the run fails with a clear error.
4. **reduce + svd**: the driver fetches one worker's partial of one layer at a time (a numpy array,
   zero-copy from the object store), adds it into one float32 buffer, takes the truncated SVD of
   the mean and drops the buffer: its peak stays near two copies of the largest layer.
5. **write**: the same artifact as :func:`loraga_ray.estimate.estimate_init`, to a local folder or
   an s3:// / gs:// prefix (:mod:`loraga_ray.storage`); nothing is written unless all went well.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import resource
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from .artifact import InitArtifact, build_meta
from .cluster import ClusterError, connect
from .factors import SVD_METHODS

log = logging.getLogger(__name__)

SAMPLE_INDEX = "_sample_index"  # column carrying each sampled row's position in the sample
TOKENISE_ROWS = 1024  # rows per tokenisation task
WORKER_CPUS = 0.25  # logical CPUs a gradient worker reserves: Ray Data's tasks need the rest
POLL_S = 0.5  # how often the driver refreshes the progress bar
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class InitOptions:
    """Everything `loraga-ray init` needs; the CLI flags map one to one."""

    model: str
    data: str
    out: str | None = None
    num_samples: int = 256
    batch_size: int = 8
    max_rank: int = 32
    workers: int = 1
    gpus_per_worker: float | None = None  # None: 1 if the cluster has GPUs, else 0
    seed: int = 0
    svd: str = "randomized"
    max_length: int = 128
    split: str = "train"
    task: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    target_modules: list[str] | None = None
    address: str | None = None
    progress: bool = True
    # beyond the first contract; all optional
    cpus_per_worker: float = WORKER_CPUS
    dtype: str = "float32"  # the workers' model dtype; the sums are float32 whatever it is
    num_labels: int | None = None  # seq-cls head size; None: max label in the data + 1 (at least 2)
    max_retries: int = 1  # whole-stage reruns after a gradient worker dies
    resource_timeout: float | None = None  # None: 60 s on a local Ray, 600 s when joining a cluster
    # test-only fault injection: worker 0 exits after this many batches on the first attempt
    _fail_after_batches: int | None = field(default=None, repr=False)


class WorkerLostError(RuntimeError):
    """A gradient worker died before it handed back its partial sums."""


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def check_options(opts: InitOptions) -> None:
    """Reject bad settings before anything expensive starts."""

    def positive_int(name):
        value = getattr(opts, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")

    for name in ("num_samples", "batch_size", "max_rank", "workers"):
        positive_int(name)
    if opts.svd not in SVD_METHODS:
        raise ValueError(f"svd={opts.svd!r} is not one of {SVD_METHODS}.")
    if opts.max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {opts.max_length}.")
    if opts.gpus_per_worker is not None and opts.gpus_per_worker < 0:
        raise ValueError(f"gpus_per_worker must be >= 0, got {opts.gpus_per_worker}.")
    if not opts.cpus_per_worker > 0:
        raise ValueError(f"cpus_per_worker must be > 0, got {opts.cpus_per_worker}.")
    if opts.dtype not in DTYPES:
        raise ValueError(f"dtype={opts.dtype!r} is not one of {DTYPES}.")
    if opts.max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {opts.max_retries}.")
    if opts.num_labels is not None and opts.num_labels < 1:
        raise ValueError(f"num_labels must be positive, got {opts.num_labels}.")


def check_out(out: str) -> None:
    """The artifact's destination must be writable (checked before the expensive work)."""
    from .storage import is_remote, local_path, resolve

    if is_remote(out):
        resolve(out)  # unknown scheme, missing credentials: a clear error now rather than at the end
        return
    path = local_path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out} is an existing file; the artifact is a folder. Pick another path.")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--out {out}: cannot write under {parent}. Pick a folder you can write, or an s3:// / gs:// prefix.")


def _unwrap(error: BaseException) -> BaseException:
    """The user-level exception inside Ray's task / Ray Data wrappers."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "cause", None) or error.__cause__
        if inner is None or not isinstance(inner, BaseException):
            break
        error = inner
    return error


def _reraise_clean(error: BaseException):
    """Raise the cause of a failed Ray task as itself when it is one of ours (a clear message)."""
    cause = _unwrap(error)
    if isinstance(cause, (ValueError, TypeError, FileNotFoundError, ImportError)):
        raise cause from None
    raise error


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@contextlib.contextmanager
def _data_context():
    """Ray Data settings for this pipeline: rows in order (the sample depends on it), no Ray Data
    progress bars (ours is the one that counts examples), and our own exceptions out of map
    functions (a missing column is a ValueError naming the columns, not a wrapped "UDF failed").
    Restored afterwards."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    names = ("enable_progress_bars", "print_on_execution_start", "raise_original_map_exception")
    saved = {name: getattr(ctx, name) for name in names}
    saved_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.raise_original_map_exception = True
    try:
        yield ctx
    finally:
        ctx.execution_options.preserve_order = saved_order
        for name, value in saved.items():
            setattr(ctx, name, value)


# ---------------------------------------------------------------------------------------------
# Stage 1: read and sample
# ---------------------------------------------------------------------------------------------


def _is_uri(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


def _path_for_tasks(path: Path) -> str:
    """An absolute path, unless the driver runs inside a Ray job's working_dir and the path lies
    in it: then relative, so every node finds it in its own copy of the working_dir."""
    import ray

    in_working_dir = False
    if ray.is_initialized():  # (get_runtime_context() would start a Ray instance otherwise)
        in_working_dir = bool(ray.get_runtime_context().runtime_env.get("working_dir"))
    resolved = path.resolve()
    if in_working_dir and not path.is_absolute():
        try:
            return str(resolved.relative_to(Path.cwd().resolve()))
        except ValueError:
            pass
    return str(resolved)


def _local_units(data: str, split: str) -> list[tuple[str, str]]:
    """The pieces of a local dataset's split, as ``(source, split)`` pairs in the order
    ``data.load_split`` concatenates them; each piece is read by one task. ``split`` is ``""``
    for a piece read whole (a file, or a subfolder named after the split)."""
    from . import data as D

    if data in D.DEMO_DATASETS:
        return [(data, split)]
    path = Path(data).expanduser()
    if not path.exists():
        D.load_split(data, split)  # raises its clear "not found" error
    canonical = D._split_of(split) or split
    if path.is_file() or (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        return [(_path_for_tasks(path), split)]  # one piece; load_split checks the split
    entries = [p for p in sorted(path.iterdir()) if p.is_dir() or D._data_format(p)]
    matched, named = [], set()
    for entry in entries:
        stem = entry.name.split(".")[0]
        entry_split = D._split_of(entry.name) or (stem if stem == canonical or entry.is_dir() else None)
        if entry_split is not None:
            named.add(entry_split)
            if entry_split == canonical:
                matched.append(entry)
    if not matched:
        files = [p for p in entries if p.is_file()]
        if not (files and not named & set(D.SPLITS) and canonical == "train"):
            D.load_split(data, split)  # raises load_split's message for this layout
        matched = files  # no file is named after a split: together they are the train split
    return [(_path_for_tasks(p), "") for p in matched]


def _given(columns: dict) -> dict:
    return {"text": columns.get("text_column"), "label": columns.get("label_column"),
            "prompt": columns.get("prompt_column"), "response": columns.get("response_column")}


def _read_pieces(batch: pa.Table, task: str, columns: dict) -> pa.Table:
    """Ray Data map function: read the pieces named in ``batch`` exactly as ``load_split`` would."""
    from . import data as D

    tables = []
    for source, split in zip(batch.column("source").to_pylist(), batch.column("split").to_pylist()):
        if split:
            tables.append(D.load_split(source, split, task=task, **columns))
        else:  # a data file, or a split's subfolder: all of it, with load_split's column handling
            tables.append(D._select_columns(D._read_unsplit(Path(source)), source, task, _given(columns)))
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def _select_block(batch: pa.Table, source: str, task: str, columns: dict) -> pa.Table:
    """Ray Data map function for natively read blocks: canonical columns, as load_split does."""
    from .data import _select_columns

    return _select_columns(batch, source, task, _given(columns))


def read_dataset(opts: InitOptions, task: str):
    """A Ray Dataset of the split's rows, canonical columns, in ``load_split`` order."""
    import ray

    columns = dict(text_column=opts.text_column, label_column=opts.label_column,
                   prompt_column=opts.prompt_column, response_column=opts.response_column)
    if _is_uri(opts.data):
        name = opts.data.rstrip("/").lower()
        if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
            ds = ray.data.read_json(opts.data, lines=".jsonl" in name)
        elif name.endswith((".csv", ".csv.gz")):
            ds = ray.data.read_csv(opts.data)
        else:  # a .parquet file or a prefix of parquet files
            ds = ray.data.read_parquet(opts.data)
        return ds.map_batches(_select_block, fn_kwargs=dict(source=opts.data, task=task, columns=columns),
                              batch_format="pyarrow", batch_size=None)
    units = _local_units(opts.data, opts.split)
    items = ray.data.from_items([{"source": s, "split": p} for s, p in units], override_num_blocks=len(units))
    return items.map_batches(_read_pieces, fn_kwargs=dict(task=task, columns=columns),
                             batch_format="pyarrow", batch_size=1)


def _block_stats(block: pa.Table) -> tuple[int, int]:
    """(rows, largest label or -1) of one block."""
    import pyarrow.compute as pc

    top = -1
    if "label" in block.column_names and block.num_rows:
        top = pc.max(block.column("label")).as_py()
        top = -1 if top is None else int(top)
    return block.num_rows, top


def _take(block: pa.Table, indices: np.ndarray) -> pa.Table:
    return block.take(pa.array(indices))


@functools.lru_cache(maxsize=None)
def _remote(fn):
    import ray

    return ray.remote(num_cpus=0.25)(fn)


def read_sample(opts: InitOptions, task: str) -> tuple[pa.Table, dict]:
    """Read the dataset with Ray Data and draw the sample: ``(sample table, info)``.

    The sample's rows are those of ``data.sample_table(load_split(...), num_samples, seed)`` in
    the same order, plus a ``_sample_index`` column 0..n-1.
    """
    import ray

    from .data import sample_indices, table_fingerprint

    ds = read_dataset(opts, task)
    try:
        refs = ds.to_arrow_refs()
        stats = ray.get([_remote(_block_stats).remote(r) for r in refs])
    except Exception as e:
        _reraise_clean(e)
    counts = [n for n, _ in stats]
    total = int(sum(counts))
    if total == 0:
        raise ValueError(f"dataset {opts.data!r} (split {opts.split!r}) has no rows with the needed columns.")
    indices, too_small = sample_indices(total, opts.num_samples, opts.seed)
    if too_small:
        warnings.warn(
            f"asked for {opts.num_samples} samples but {opts.data} ({opts.split}) has only {total} rows; "
            f"using all {total} of them (the artifact's meta records the counts)."
        )
    starts = np.concatenate([[0], np.cumsum(counts)])
    parts = []
    for b, ref in enumerate(refs):
        lo, hi = np.searchsorted(indices, [starts[b], starts[b + 1]])
        if hi > lo:
            parts.append(_remote(_take).remote(ref, indices[lo:hi] - starts[b]))
    tables = ray.get(parts)
    sample = pa.concat_tables(tables, promote_options="default").combine_chunks()
    del refs  # the full blocks can go now
    info = {
        "dataset_rows": total,
        "num_samples_requested": opts.num_samples,
        "sample_too_small": bool(too_small),
        "dataset_fingerprint": table_fingerprint(sample),
        "max_label": max(top for _, top in stats),
        "sample_bytes": int(sample.nbytes),
    }
    sample = sample.append_column(SAMPLE_INDEX, pa.array(np.arange(sample.num_rows, dtype=np.int64)))
    return sample, info


def _tokenise(table: pa.Table, encoder) -> pa.Table:
    """Ray Data map function: the sample's rows -> input_ids / labels (token lists) + index."""
    batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names if name != SAMPLE_INDEX}
    encoded = encoder(batch)
    ids = pa.array([x.tolist() for x in encoded["input_ids"]], type=pa.list_(pa.int64()))
    if encoder.task == "causal-lm":
        labels = pa.array([x.tolist() for x in encoded["labels"]], type=pa.list_(pa.int64()))
    else:
        labels = pa.array(np.asarray(encoded["labels"], dtype=np.int64))
    return pa.table({"input_ids": ids, "labels": labels, SAMPLE_INDEX: table.column(SAMPLE_INDEX)})


def token_stream(sample: pa.Table, encoder, batch_size: int, workers: int):
    """Ray Data pipeline: tokenise the sample on CPU, cut it into blocks of at most one batch,
    and split it into one stream per worker (every row goes to exactly one stream)."""
    import ray

    chunks = [sample.slice(i, TOKENISE_ROWS) for i in range(0, sample.num_rows, TOKENISE_ROWS)]
    ds = ray.data.from_arrow(chunks)
    ds = ds.map_batches(_tokenise, fn_kwargs=dict(encoder=encoder), batch_format="pyarrow", batch_size=None, num_cpus=0.5)
    ds = ds.repartition(target_num_rows_per_block=batch_size)
    return ds.streaming_split(workers, equal=False)


# ---------------------------------------------------------------------------------------------
# Stages 2-3: gradient workers
# ---------------------------------------------------------------------------------------------


class GradientWorker:
    """One gradient worker (a Ray actor): holds the model, streams batches, keeps float32 sums.

    ``setup`` loads the model (so load errors come back as ordinary task errors), ``consume``
    runs the stream, ``progress`` answers while ``consume`` runs (the actor has two threads),
    ``layer`` hands back one layer's partial sum and forgets it.
    """

    def __init__(self, model: str, task: str, num_labels: int, seed: int, target_modules, max_rank: int,
                 rank: int, dtype: str = "float32", fail_after_batches: int | None = None):
        self.model_name, self.task, self.num_labels, self.seed, self.dtype = model, task, num_labels, seed, dtype
        self.target_modules, self.max_rank, self.rank = target_modules, max_rank, rank
        self.fail_after_batches = fail_after_batches
        self.examples = self.tokens = 0
        self.sums = {}

    def setup(self) -> dict:
        import socket

        import ray
        import torch

        from .artifact import weight_fingerprint
        from .estimate import check_rank_fits
        from .models import load_model, load_tokenizer
        from .targets import find_target_modules

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(self.model_name, task=self.task, num_labels=self.num_labels, seed=self.seed,
                                dtype=getattr(torch, self.dtype)).to(self.device)
        self.pad_id = load_tokenizer(self.model_name, task=self.task).pad_token_id
        self.names = find_target_modules(self.model, self.target_modules)
        shapes = check_rank_fits(self.model, self.names, self.max_rank)
        return {
            "rank": self.rank,
            "node": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(self.device),
            "cpu_count": os.cpu_count() or 1,
            "names": list(self.names),
            "shapes": {n: list(s) for n, s in shapes.items()},
            "fingerprint": weight_fingerprint(self.model, self.names),
            "model_class": type(self.model).__name__,
        }

    def consume(self, stream, batch_size: int, threads: int, fail: bool = False) -> dict:
        import torch

        from .data import collate
        from .gradients import GradientAccumulator

        if self.device.type == "cpu":
            torch.set_num_threads(max(1, threads))
        seen, batches = [], 0
        with GradientAccumulator(self.model, self.names) as acc:
            for batch in stream.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=1):
                tensors = collate({"input_ids": batch["input_ids"], "labels": batch["labels"]}, self.pad_id, self.task)
                n_tokens = int(tensors["attention_mask"].sum())
                acc.step({k: v.to(self.device, non_blocking=True) for k, v in tensors.items()})
                seen.append(np.asarray(batch[SAMPLE_INDEX], dtype=np.int64))
                batches += 1
                self.examples += len(seen[-1])
                self.tokens += n_tokens
                if fail and self.fail_after_batches is not None and batches >= self.fail_after_batches:
                    os._exit(1)  # test-only: a worker lost mid-stream
            result = acc.sums()
        self.sums = result.sums
        return {
            "rank": self.rank,
            "examples": result.num_examples,
            "targets": result.num_targets,
            "tokens": self.tokens,
            "batches": result.num_batches,
            "seconds": result.seconds,
            "ids": np.concatenate(seen) if seen else np.zeros(0, dtype=np.int64),
        }

    def progress(self) -> tuple[int, int]:
        return self.examples, self.tokens

    def layer(self, name: str) -> np.ndarray:
        return self.sums.pop(name).cpu().numpy()


@dataclass
class _Plan:
    gpus: float
    cpus: float
    timeout: float


def plan_resources(opts: InitOptions, joined_cluster: bool) -> _Plan:
    """What each worker asks for; fails at once, with the numbers, when the cluster can never
    give it (a local Ray does not grow; a joined cluster may autoscale, so that is left to the
    placement-group wait)."""
    import ray

    total = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    gpus = opts.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if total.get("GPU", 0) >= 1 else 0.0
    cpus = float(opts.cpus_per_worker)
    need_gpu, need_cpu = gpus * opts.workers, cpus * opts.workers
    have_gpu, have_cpu = total.get("GPU", 0.0), total.get("CPU", 0.0)
    node_gpu = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    node_cpu = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    problems = []
    if need_gpu > have_gpu:
        problems.append(f"{opts.workers} workers x {gpus:g} GPU = {need_gpu:g} GPUs, the cluster has {have_gpu:g}")
    elif gpus > node_gpu:
        problems.append(f"{gpus:g} GPUs per worker, the largest node has {node_gpu:g}")
    if need_cpu > have_cpu:
        problems.append(f"{opts.workers} workers x {cpus:g} CPU = {need_cpu:g} CPUs, the cluster has {have_cpu:g}")
    elif cpus > node_cpu:
        problems.append(f"{cpus:g} CPUs per worker, the largest node has {node_cpu:g}")
    timeout = opts.resource_timeout if opts.resource_timeout is not None else (600.0 if joined_cluster else 60.0)
    if problems and not joined_cluster:
        raise ClusterError(
            "the gradient workers ask for more than this Ray instance has: " + "; ".join(problems) + ". "
            "Lower --workers or --gpus-per-worker (0 runs on CPU), or join a larger cluster with --address."
        )
    if problems:
        log.warning("the cluster has too little right now (%s); waiting up to %.0fs for the autoscaler",
                    "; ".join(problems), timeout)
    return _Plan(gpus=gpus, cpus=cpus, timeout=timeout)


def _reserve(plan: _Plan, workers: int):
    """A placement group holding every worker's bundle (all start together, or none does)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = {"CPU": plan.cpus}
    if plan.gpus > 0:
        bundle["GPU"] = plan.gpus
    pg = placement_group([dict(bundle) for _ in range(workers)], strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=plan.timeout)
    if not ready:
        remove_placement_group(pg)
        total = ray.cluster_resources()
        raise ClusterError(
            f"{workers} gradient workers of {bundle} could not be placed within {plan.timeout:.0f}s; the cluster "
            f"has {total.get('GPU', 0):g} GPUs and {total.get('CPU', 0):g} CPUs in all, some maybe busy or on nodes "
            "too small for one worker. Lower --workers / --gpus-per-worker, free the cluster, or raise "
            "--resource-timeout if the autoscaler is still adding nodes."
        )
    return pg


def start_workers(opts: InitOptions, plan: _Plan, pg, task: str, num_labels: int) -> tuple[list, list[dict]]:
    """Create the actors and load the model in each; checks they all hold the same weights."""
    import ray
    from ray.exceptions import RayActorError
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    actor = ray.remote(GradientWorker)
    workers = []
    for i in range(opts.workers):
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
        workers.append(actor.options(num_cpus=plan.cpus, num_gpus=plan.gpus, max_concurrency=2,
                                     scheduling_strategy=strategy).remote(
            opts.model, task, num_labels, opts.seed, opts.target_modules, opts.max_rank, i, opts.dtype,
            opts._fail_after_batches))
    try:
        infos = ray.get([w.setup.remote() for w in workers])
    except RayActorError as e:
        _kill(workers)
        raise WorkerLostError(f"a gradient worker died while loading {opts.model!r}: {str(e).splitlines()[0]}") from e
    except Exception as e:
        _kill(workers)
        _reraise_clean(e)
    prints = {info["fingerprint"] for info in infos}
    if len(prints) > 1:
        _kill(workers)
        hosts = sorted({info["host"] for info in infos})
        raise RuntimeError(
            f"the gradient workers loaded different weights for {opts.model!r} (hosts {hosts}); every node must "
            "see the same model files: install them in the cluster's setup or use shared storage."
        )
    return workers, infos


def _kill(workers) -> None:
    import ray

    for w in workers:
        with contextlib.suppress(Exception):
            ray.kill(w, no_restart=True)


def _threads(infos: list[dict]) -> int:
    """Torch threads for a CPU worker: the node's cores shared among the workers on it."""
    per_node = {}
    for info in infos:
        per_node.setdefault(info["node"], []).append(info["cpu_count"])
    return max(1, min(cores[0] // len(cores) for cores in per_node.values()))


def run_gradient(workers, infos, streams, opts: InitOptions, total: int, attempt: int) -> list[dict]:
    """Stream the sample through the workers; returns each worker's counts and sample indices."""
    import ray
    from ray.exceptions import RayActorError

    threads = _threads(infos)
    refs = [w.consume.remote(s, opts.batch_size, threads, attempt == 0 and i == 0)
            for i, (w, s) in enumerate(zip(workers, streams))]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[dict | None] = [None] * len(refs)
    bar = None
    if opts.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"gradient ({len(workers)} worker{'s' if len(workers) > 1 else ''})",
                   unit="ex", dynamic_ncols=True)
    t0 = time.perf_counter()
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
            for ref in done:
                i = index[ref]
                try:
                    results[i] = ray.get(ref)
                except RayActorError as e:
                    raise WorkerLostError(f"gradient worker {i} ({infos[i]['host']}, pid {infos[i]['pid']}) died "
                                          f"mid-stream: {str(e).splitlines()[0]}") from e
                except Exception as e:
                    _reraise_clean(e)
            if bar is not None:
                done_results = [r for r in results if r is not None]
                examples = sum(r["examples"] for r in done_results)
                tokens = sum(r["tokens"] for r in done_results)
                asks = [w.progress.remote() for i, w in enumerate(workers) if results[i] is None]
                for ask in asks:
                    with contextlib.suppress(Exception):  # a dead worker is reported by its consume call
                        e_i, t_i = ray.get(ask, timeout=5)
                        examples, tokens = examples + e_i, tokens + t_i
                bar.n = examples
                bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f}", refresh=False)
                bar.refresh()
    finally:
        if bar is not None:
            bar.close()
    return results


def check_counts(results: list[dict], total: int) -> None:
    """Every sampled example counted exactly once, or a loud error: never a silently wrong artifact."""
    ids = np.concatenate([r["ids"] for r in results]) if results else np.zeros(0, dtype=np.int64)
    counted = np.bincount(ids, minlength=total) if ids.size else np.zeros(total, dtype=np.int64)
    missing = int((counted[:total] == 0).sum())
    twice = int((counted > 1).sum())
    examples = sum(r["examples"] for r in results)
    if missing or twice or len(counted) != total or examples != total:
        raise RuntimeError(
            f"the gradient workers counted {examples} examples for a sample of {total} ({missing} never seen, "
            f"{twice} seen more than once); the estimate would be wrong, so no artifact is written. "
            "This is a bug or a data-pipeline fault: please report it with the command line."
        )


# ---------------------------------------------------------------------------------------------
# Stage 4: reduce + SVD
# ---------------------------------------------------------------------------------------------


def reduce_and_factorize(workers, names, num_examples: int, num_targets: int, opts: InitOptions) -> tuple[dict, dict]:
    """Sum the workers' partials one layer and one worker at a time, then SVD that layer."""
    import ray
    import torch
    from ray.exceptions import RayActorError

    from .estimate import factorize
    from .gradients import GradientSums

    device = "cuda" if torch.cuda.is_available() else None
    factors, moved, peak, reduce_s, svd_s = {}, 0, 0, 0.0, 0.0
    layers = names
    if opts.progress:
        from tqdm.auto import tqdm

        layers = tqdm(names, desc="reduce + svd", unit="layer", dynamic_ncols=True)
    for name in layers:
        t0 = time.perf_counter()
        buf = None
        for i, w in enumerate(workers):
            try:
                part = ray.get(w.layer.remote(name))
            except RayActorError as e:
                raise WorkerLostError(f"gradient worker {i} died while handing back its sums: {str(e).splitlines()[0]}") from e
            moved += part.nbytes
            if buf is None:
                buf = np.array(part, dtype=np.float32, copy=True)
                peak = max(peak, 2 * part.nbytes)
            else:
                buf += part
            del part
        t1 = time.perf_counter()
        sums = GradientSums({name: torch.from_numpy(buf)}, num_examples=num_examples, num_targets=num_targets)
        factors.update(factorize(sums, k=2 * opts.max_rank, svd=opts.svd, seed=opts.seed, device=device))
        del buf, sums
        svd_s += time.perf_counter() - t1
        reduce_s += t1 - t0
    return factors, {"reduce_s": reduce_s, "svd_s": svd_s, "reduce_bytes": moved, "reduce_peak_mb": peak / 2**20}


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


def _num_labels(opts: InitOptions, task: str, max_label: int) -> int:
    if task != "seq-cls":
        return 2  # unused by causal LMs
    if opts.num_labels is not None:
        if max_label >= opts.num_labels:
            raise ValueError(f"the data has label {max_label} but num_labels={opts.num_labels}; labels must be 0..num_labels-1.")
        return opts.num_labels
    return max(2, max_label + 1)


def run_init(opts: InitOptions) -> tuple[InitArtifact, dict]:
    """Estimate the LoRA-GA init on Ray; writes ``opts.out`` if given (local folder, s3://, gs://)
    and returns ``(artifact, summary)``.

    Connects with ``cluster.connect(opts.address)`` unless Ray is already initialised (then it
    uses that instance); an embedded Ray it started is shut down at the end. The result equals
    single-process :func:`estimate_init` on the same sample to float32 rounding.
    """
    import ray

    from .models import resolve_model

    check_options(opts)
    spec = resolve_model(opts.model, opts.task)  # clear error for an unknown model, before Ray starts
    if opts.out:
        check_out(opts.out)
    task = spec.task
    started_ray = not ray.is_initialized()
    joined_cluster = bool(opts.address or os.environ.get("RAY_ADDRESS"))
    if started_ray:
        connect(opts.address, quiet=opts.progress)
    elif opts.address:
        log.warning("Ray is already initialised in this process; using that instance, not --address %s", opts.address)
    try:
        with _data_context():
            return _run(opts, task, joined_cluster)
    finally:
        if started_ray:
            ray.shutdown()


def _run(opts: InitOptions, task: str, joined_cluster: bool) -> tuple[InitArtifact, dict]:
    from ray.util.placement_group import remove_placement_group

    from .data import Encoder
    from .models import DEMO_MODELS

    times = {}
    t0 = time.perf_counter()
    log.info("reading %s (%s) and drawing %d samples (seed %d)", opts.data, opts.split, opts.num_samples, opts.seed)
    sample, info = read_sample(opts, task)
    total = sample.num_rows
    times["read_s"] = time.perf_counter() - t0
    log.info("read: %d of %d rows sampled in %.1fs", total, info["dataset_rows"], times["read_s"])
    num_labels = _num_labels(opts, task, info["max_label"])

    plan = plan_resources(opts, joined_cluster)
    # the model is named by its path: every worker resolves it on its own node
    model = opts.model if opts.model in DEMO_MODELS or _is_uri(opts.model) else _path_for_tasks(Path(opts.model).expanduser())
    run_opts = replace(opts, model=model)
    encoder = Encoder(model, task, opts.max_length)
    retries = 0
    for attempt in range(opts.max_retries + 1):
        t1 = time.perf_counter()
        pg = _reserve(plan, opts.workers)
        workers = []
        try:
            # the stream's coordinator actor starts while the workers load the model
            streams = token_stream(sample, encoder, opts.batch_size, opts.workers)
            workers, infos = start_workers(run_opts, plan, pg, task, num_labels)
            times["start_s"] = time.perf_counter() - t1
            log.info("%d gradient worker(s) on %s", len(workers), ", ".join(sorted({f"{i['host']}:{i['device']}" for i in infos})))
            t2 = time.perf_counter()
            results = run_gradient(workers, infos, streams, run_opts, total, attempt)
            times["gradient_s"] = time.perf_counter() - t2
            check_counts(results, total)
            num_examples = sum(r["examples"] for r in results)
            num_targets = sum(r["targets"] for r in results)
            factors, red = reduce_and_factorize(workers, infos[0]["names"], num_examples, num_targets, opts)
            break
        except WorkerLostError as e:
            if attempt >= opts.max_retries:
                raise WorkerLostError(
                    f"{e}. Gave up after {attempt + 1} attempt(s) (--max-retries {opts.max_retries}); no artifact was "
                    "written. Check the worker's logs (out of memory? preempted node?) and rerun."
                ) from e
            retries += 1
            log.warning("%s; running the gradient stage again on fresh workers (attempt %d of %d)",
                        e, attempt + 2, opts.max_retries + 1)
        finally:
            _kill(workers)
            remove_placement_group(pg)
    times["reduce_s"], times["svd_s"] = red["reduce_s"], red["svd_s"]
    log.info("gradient: %d examples in %.1fs; reduce %.1fs (%.1f MiB moved), svd %.1fs", total, times["gradient_s"],
             times["reduce_s"], red["reduce_bytes"] / 2**20, times["svd_s"])

    info0 = infos[0]
    num_tokens = sum(r["tokens"] for r in results)
    num_batches = sum(r["batches"] for r in results)
    meta = build_meta(
        model=None,
        target_names=info0["names"],
        shapes={n: tuple(s) for n, s in info0["shapes"].items()},
        fingerprint=info0["fingerprint"],
        k=2 * opts.max_rank,
        num_examples=num_examples,
        num_targets=num_targets,
        seed=opts.seed,
        svd=opts.svd,
        niter=4,
        oversample=None,
        base_model=opts.model,
        dataset_fingerprint=info["dataset_fingerprint"],
        timings={k: round(v, 4) for k, v in times.items()},
        extra={
            "num_batches": num_batches,
            "num_tokens": num_tokens,
            "workers": opts.workers,
            "dataset": opts.data,
            "split": opts.split,
            "dataset_rows": info["dataset_rows"],
            "num_samples_requested": opts.num_samples,
            "task": task,
            "num_labels": num_labels if task == "seq-cls" else None,
            "max_length": opts.max_length,
            "model_dtype": opts.dtype,
            "batch_size": opts.batch_size,
        },
    )
    meta["model_class"] = info0["model_class"]
    artifact = InitArtifact(factors=factors, meta=meta)

    t3 = time.perf_counter()
    out = None
    if opts.out:
        from .storage import save_artifact

        out = save_artifact(artifact, opts.out)
    times["write_s"] = time.perf_counter() - t3
    elapsed = time.perf_counter() - t0
    summary = {
        "out": out,
        "workers": opts.workers,
        "devices": sorted({i["device"] for i in infos}),
        "nodes": len({i["node"] for i in infos}),
        "gpus_per_worker": plan.gpus,
        "num_examples": num_examples,
        "num_targets": num_targets,
        "num_tokens": num_tokens,
        "num_batches": num_batches,
        "examples_per_worker": [r["examples"] for r in results],
        "compute_s_per_worker": [round(r["seconds"], 3) for r in results],  # forward+backward time only
        "dataset_rows": info["dataset_rows"],
        "sample_too_small": info["sample_too_small"],
        **{k: round(v, 3) for k, v in times.items()},
        "total_s": round(elapsed, 3),
        "tokens_per_s": round(num_tokens / max(times["gradient_s"], 1e-9), 1),
        "bytes_moved": int(info["sample_bytes"] + red["reduce_bytes"]),
        "sample_bytes": int(info["sample_bytes"]),
        "reduce_bytes": int(red["reduce_bytes"]),
        "reduce_peak_mb": round(red["reduce_peak_mb"], 2),
        "driver_peak_rss_mb": round(_peak_rss_mb(), 1),
        "retries": retries,
    }
    return artifact, summary


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="demo-minilm, demo-smollm2, or a local Hugging Face model folder")
    p.add_argument("--data", required=True,
                   help="demo-rotten-tomatoes, demo-arithmetic, a local .parquet/.jsonl/.csv file or folder, a "
                        "save_to_disk folder, or an s3:// / gs:// parquet, jsonl or csv location")
    p.add_argument("--out", required=True, help="where the artifact goes: a local folder, s3://bucket/prefix or gs://bucket/prefix")
    p.add_argument("--num-samples", type=int, default=256, help="examples in the gradient estimate (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward/backward pass (default 8)")
    p.add_argument("--max-rank", type=int, default=32, help="largest LoRA rank the artifact serves; keeps 2*max_rank singular triplets")
    p.add_argument("--workers", type=int, default=1, help="gradient workers (Ray actors) (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per worker (default: 1 if the cluster has GPUs now, else 0 = CPU); "
                        "pass 1 on an autoscaling cluster whose GPU nodes start at zero")
    p.add_argument("--cpus-per-worker", type=float, default=WORKER_CPUS,
                   help=f"logical CPUs each worker reserves (default {WORKER_CPUS}; Ray Data's tasks use the rest)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="model dtype on the workers (bfloat16 halves GPU memory; gradients still sum in float32)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (and the seed of a new classifier head)")
    p.add_argument("--svd", choices=SVD_METHODS, default="randomized", help="truncated SVD method (default randomized)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example after truncation (default 128)")
    p.add_argument("--split", default="train", help="dataset split (default train)")
    p.add_argument("--task", choices=("seq-cls", "causal-lm"), default=None, help="default: from the model's config")
    p.add_argument("--text-column", default=None, help="seq-cls text column (default text)")
    p.add_argument("--label-column", default=None, help="seq-cls label column (default label)")
    p.add_argument("--prompt-column", default=None, help="causal-lm prompt column (default prompt)")
    p.add_argument("--response-column", default=None, help="causal-lm response column (default response)")
    p.add_argument("--num-labels", type=int, default=None, help="seq-cls classes (default: largest label + 1)")
    p.add_argument("--target-modules", default=None,
                   help="comma-separated Linear names or suffixes to adapt (default: every Linear but the head)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--max-retries", type=int, default=1, help="rerun the gradient stage this often if a worker dies (default 1)")
    p.add_argument("--resource-timeout", type=float, default=None,
                   help="seconds to wait for the workers' resources (default 60 locally, 600 on a joined cluster)")
    p.add_argument("--summary-json", default=None, help="also write the run summary to this JSON file")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def options_from_args(args) -> InitOptions:
    targets = args.target_modules
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()] or None
    names = {f for f in InitOptions.__dataclass_fields__ if not f.startswith("_")}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["target_modules"] = targets
    return InitOptions(**values)


def format_summary(summary: dict) -> str:
    mb = 2**20
    lines = [
        f"examples {summary['num_examples']} ({summary['num_tokens']} tokens, {summary['num_targets']} targets) on "
        f"{summary['workers']} worker(s) {'/'.join(summary['devices'])}, {summary['nodes']} node(s); "
        f"per worker {summary['examples_per_worker']}",
        "time  " + "  ".join(f"{k[:-2]} {summary[k]:.2f}s" for k in ("read_s", "start_s", "gradient_s", "reduce_s", "svd_s", "write_s") if k in summary)
        + f"  total {summary['total_s']:.2f}s  ({summary['tokens_per_s']:.0f} tokens/s)",
        f"moved {summary['bytes_moved'] / mb:.1f} MiB (sample {summary['sample_bytes'] / mb:.2f}, reduce {summary['reduce_bytes'] / mb:.1f}); "
        f"driver peak RSS {summary['driver_peak_rss_mb']:.0f} MiB, reduce buffers {summary['reduce_peak_mb']:.1f} MiB",
    ]
    if summary.get("retries"):
        lines.append(f"retries {summary['retries']} (a gradient worker was lost and its stage rerun)")
    if summary.get("out"):
        lines.append(f"artifact -> {summary['out']}")
    return "\n".join(lines)


def run(args) -> int:
    import json

    opts = options_from_args(args)
    _, summary = run_init(opts)
    print(format_summary(summary))
    if getattr(args, "summary_json", None):
        Path(args.summary_json).write_text(json.dumps(summary, indent=2))
    return 0
