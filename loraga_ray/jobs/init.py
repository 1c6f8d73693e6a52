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
5. **write**: the same artifact as :func:`loraga_ray.core.estimate.estimate_init`, to a local folder or
   an s3:// / gs:// prefix (:mod:`loraga_ray.core.storage`); nothing is written unless all went well.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..core.artifact import InitArtifact, build_meta
from ..core.files import output_lock
from ..options import InitOptions
from .cluster import connect, reraise_clean
from .gradient_worker import (
    LOST_ERRORS,
    WorkerLostError,
    check_counts,
    kill_workers,
    reserve,
    run_gradient,
    start_workers,
    warm_heads,
)
from .init_data import data_context, is_uri, path_for_tasks, read_sample, token_shards, token_streams
from .init_strategy import Decision, decide, model_plan
from .resources import WorkerResources, plan_workers

log = logging.getLogger(__name__)

__all__ = ["InitOptions", "WorkerLostError", "run_init", "format_summary", "check_out"]


def check_out(out: str, overwrite: bool = False) -> None:
    """The artifact's destination must be writable and hold nothing we would lose (checked before
    the expensive work)."""
    from ..core.storage import check_artifact_destination, is_remote, local_path

    check_artifact_destination(out, overwrite=overwrite)  # also: unknown scheme, missing credentials
    if is_remote(out):
        return
    path = local_path(out)
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--out {out}: cannot write under {parent}. Pick a folder you can write, or an s3:// / gs:// prefix.")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


def run_init(opts: InitOptions) -> tuple[InitArtifact, dict]:
    """Estimate the LoRA-GA init on Ray; writes ``opts.out`` if given (local folder, s3://, gs://)
    and returns ``(artifact, summary)``.

    Connects with ``cluster.connect(opts.address)`` unless Ray is already initialised (then it
    uses that instance); an embedded Ray it started is shut down at the end. The result equals
    single-process :func:`loraga_ray.core.estimate.estimate_init` on the same sample to float32
    rounding.
    """
    from ..models import resolve_model

    opts.validate()
    # a clear error for an unknown model or missing / damaged / pickled weights, before Ray starts
    spec = resolve_model(opts.model, opts.task, allow_pickle_weights=opts.allow_pickle_weights)
    with contextlib.ExitStack() as stack:
        if opts.out:
            from ..core.storage import is_remote, local_path

            if not is_remote(opts.out):  # one writer per output, for the whole run
                stack.enter_context(output_lock(local_path(opts.out)))
            check_out(opts.out, opts.overwrite)
        return _connect_and_estimate(opts, spec.task)


def _connect_and_estimate(opts: InitOptions, task: str) -> tuple[InitArtifact, dict]:
    import ray

    started_ray = not ray.is_initialized()
    if started_ray:
        connect(opts.address, quiet=opts.progress)
    elif opts.address:
        log.warning("Ray is already initialised in this process; using that instance, not --address %s", opts.address)
    try:
        with data_context():
            return _estimate(opts, task)
    finally:
        if started_ray:
            ray.shutdown()


@dataclass
class _Gradients:
    """What the gradient stage hands on: per-worker counts, the workers' setup info, the factors."""

    results: list[dict]
    infos: list[dict]
    factors: dict
    reduce: dict
    retries: int
    decision: Decision
    memory: list[dict]  # per worker: tensor bytes held and peak memory
    warmup: dict | None = None  # --head-warmup-steps: steps, lr, batch size, first and last loss

    def total(self, key: str) -> int:
        return int(sum(r[key] for r in self.results))


def _estimate(opts: InitOptions, task: str) -> tuple[InitArtifact, dict]:
    """read -> sample -> (start workers -> gradient -> reduce + svd, retried) -> write."""
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    log.info("reading %s (%s) and drawing %d samples (seed %d)", opts.data, opts.split, opts.num_samples, opts.seed)
    sample, info = read_sample(opts, task)
    times["read_s"] = time.perf_counter() - t0
    log.info("read: %d of %d rows sampled in %.1fs", sample.num_rows, info["dataset_rows"], times["read_s"])
    num_labels = _num_labels(opts, task, info["max_label"], info.get("label_names"))
    if opts.head_warmup_steps and task != "seq-cls":
        raise ValueError(f"--head-warmup-steps fits a new classifier head; this is a {task} run, whose model has none. "
                         "Drop --head-warmup-steps.")
    plan = plan_workers("gradient workers", opts.workers, gpus_per_worker=opts.gpus_per_worker,
                        cpus_per_worker=opts.cpus_per_worker, address=opts.address,
                        resource_timeout=opts.resource_timeout)
    shape = model_plan(opts, task, num_labels)  # a quantised base, or sharded without blocks: refused here
    grads = _gradient_stage(opts, plan, sample, task, num_labels, times, shape)
    head = {n: torch.from_numpy(np.array(a)) for n, a in grads.infos[0]["head"].items()} or None
    artifact = InitArtifact(factors=grads.factors, meta=_meta(opts, task, num_labels, info, grads, times, head),
                            head=head)
    t3 = time.perf_counter()
    out = None
    if opts.out:
        from ..core.storage import save_artifact

        out = save_artifact(artifact, opts.out, overwrite=opts.overwrite)
    times["write_s"] = time.perf_counter() - t3
    return artifact, _summary(opts, info, grads, plan, times, out, time.perf_counter() - t0)


def _gradient_stage(opts: InitOptions, plan: WorkerResources, sample, task: str, num_labels: int,
                    times: dict, shape) -> _Gradients:
    """Start the workers, stream the sample through them, reduce and factorise; a worker lost on
    the way makes the whole stage run again on fresh workers (``max_retries`` times)."""
    import ray
    from ray.util.placement_group import remove_placement_group

    from ..data import Encoder
    from ..models import DEMO_MODELS
    from ..planner import fmt_bytes

    # the model is named by its path: every worker resolves it on its own node
    model = opts.model if opts.model in DEMO_MODELS or is_uri(opts.model) else path_for_tasks(Path(opts.model).expanduser())
    run_opts = replace(opts, model=model)
    encoder = Encoder(model, task, opts.max_length)
    total = sample.num_rows
    warm_batches = ray.put(warmup_batches(sample, encoder, opts.batch_size, task)) if opts.head_warmup_steps else None
    decided = []  # the strategy is decided once, from the first workers' memory, and kept on a retry

    def choose(probes):
        if not decided:
            decided.append(decide(opts, task, num_labels, probes, shape))
            d = decided[0]
            log.info("init strategy %s (%s; %s per worker of %s by the planner)%s", d.strategy, d.reason,
                     fmt_bytes(d.per_worker_bytes or 0), fmt_bytes(d.memory_bytes or 0),
                     f"; micro-batch lowered to {d.batch_size} to fit" if d.batch_size < opts.batch_size else "")
        return decided[0]

    def make_streams(d):
        if d.strategy == "sharded":  # fixed contiguous shares: the ranks step in lockstep, never waiting on each other's data
            return token_shards(sample, encoder, d.batch_size, opts.workers)
        return token_streams(sample, encoder, d.batch_size, opts.workers)

    for attempt in range(opts.max_retries + 1):
        t1 = time.perf_counter()
        pg = reserve(plan)
        workers = []
        try:
            workers, infos, d, streams = start_workers(run_opts, plan, pg, task, num_labels, choose=choose,
                                                       make_streams=make_streams)
            times["start_s"] = time.perf_counter() - t1
            log.info("%d gradient worker(s) on %s", len(workers), ", ".join(sorted({f"{i['host']}:{i['device']}" for i in infos})))
            warmup = None
            if warm_batches is not None:
                if d.strategy == "sharded":
                    raise ValueError("--head-warmup-steps runs on one gradient worker that holds the whole model, but "
                                     f"this model needs the sharded strategy ({d.reason}); drop --head-warmup-steps.")
                tw = time.perf_counter()
                warmup = warm_heads(workers, infos, warm_batches, opts)
                times["head_warmup_s"] = time.perf_counter() - tw
                log.info("head warm-up: %d steps at lr %g, loss %.4f -> %.4f in %.1fs", warmup["steps"], warmup["lr"],
                         warmup["loss_first"], warmup["loss_last"], times["head_warmup_s"])
            t2 = time.perf_counter()
            results = run_gradient(workers, infos, streams, replace(run_opts, batch_size=d.batch_size), total)
            times["gradient_s"] = time.perf_counter() - t2
            check_counts(results, total)
            memory = ray.get([w.memory.remote() for w in workers])
            examples, targets = (int(sum(r[k] for r in results)) for k in ("examples", "targets"))
            if d.strategy == "sharded":
                from ..core.estimate import check_sample_counts

                check_sample_counts(examples, targets)  # (factorize checks the replicated path's)
                factors, red = sharded_factorize(workers, infos[0], targets, opts)
            else:
                factors, red = reduce_and_factorize(workers, infos[0]["names"], examples, targets, opts)
            times["reduce_s"], times["svd_s"] = red["reduce_s"], red["svd_s"]
            log.info("gradient: %d examples in %.1fs; reduce %.1fs (driver received %.2f MiB), svd %.1fs", total,
                     times["gradient_s"], times["reduce_s"], red["reduce_bytes"] / 2**20, times["svd_s"])
            return _Gradients(results, infos, factors, red, retries=attempt, decision=d, memory=memory, warmup=warmup)
        except (WorkerLostError, *LOST_ERRORS) as e:  # a worker, or objects it owned, gone
            if not isinstance(e, WorkerLostError):
                e = WorkerLostError(f"a gradient worker's results were lost ({type(e).__name__}: "
                                    f"{(str(e).strip().splitlines() or [''])[0]})")
            if attempt >= opts.max_retries:
                raise WorkerLostError(
                    f"{e}. Gave up after {attempt + 1} attempt(s) (--max-retries {opts.max_retries}); no artifact was "
                    "written. Check the worker's logs (out of memory? preempted node?) and rerun."
                ) from e
            log.warning("%s; running the gradient stage again on fresh workers (attempt %d of %d)",
                        e, attempt + 2, opts.max_retries + 1)
        finally:
            kill_workers(workers)
            remove_placement_group(pg)
    raise AssertionError("unreachable")


def warmup_batches(sample, encoder, batch_size: int, task: str) -> list[dict]:
    """The sample in its order, collated in batches of ``batch_size``: the batches the head
    warm-up cycles through (those ``training.build.estimate_batches`` gives a Train worker)."""
    from ..data import iter_batches
    from .init_data import SAMPLE_INDEX

    return list(iter_batches(sample.drop_columns([SAMPLE_INDEX]), encoder, batch_size,
                             encoder.tokenizer.pad_token_id, task))


def reduce_and_factorize(workers, names, num_examples: int, num_targets: int, opts: InitOptions) -> tuple[dict, dict]:
    """Sum the workers' partials one layer and one worker at a time, then SVD that layer."""
    import ray
    import torch
    from ..core.estimate import factorize
    from ..core.gradients import GradientSums

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
            except LOST_ERRORS as e:
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


def sharded_factorize(workers, info0: dict, num_targets: int, opts: InitOptions) -> tuple[dict, dict]:
    """The distributed SVD, one layer at a time on all workers together (core.sharded_svd): the
    driver receives each worker's rows of the sharded factor and, from rank 0, the singular values
    and the other factor: the artifact's size, never a gradient."""
    import ray
    import torch

    from ..core.factors import fix_signs

    factors, received, svd_s = {}, 0, 0.0
    names = info0["names"]
    layers = names
    if opts.progress:
        from tqdm.auto import tqdm

        layers = tqdm(names, desc="sharded svd", unit="layer", dynamic_ncols=True)
    k = 2 * opts.max_rank
    for name in layers:
        t0 = time.perf_counter()
        try:
            parts = ray.get([w.svd_layer.remote(name, k, num_targets, opts.svd == "exact", opts.seed) for w in workers])
        except LOST_ERRORS as e:
            raise WorkerLostError(f"a gradient worker died during the sharded SVD of {name}: {str(e).splitlines()[0]}") from e
        except Exception as e:
            reraise_clean(e)
        received += sum(a.nbytes for p in parts for key, a in p.items() if isinstance(a, np.ndarray))
        rows = torch.from_numpy(np.concatenate([p["rows"] for p in parts]))  # (a new, writable array)
        S, other = torch.tensor(parts[0]["S"]), torch.tensor(parts[0]["other"])
        U, V = (other, rows) if parts[0]["transposed"] else (rows, other)  # a Conv1D layer's shards are rows of Gᵀ
        d_out, d_in = info0["shapes"][name]
        if tuple(U.shape) != (d_out, k) or tuple(V.shape) != (d_in, k):
            raise RuntimeError(f"the sharded SVD of {name} gave U {tuple(U.shape)}, V {tuple(V.shape)} for a "
                               f"{d_out}x{d_in} layer; this is a bug, please report it.")
        U, V = fix_signs(U, V)
        factors[name] = (U.contiguous(), S.contiguous(), V.contiguous())
        svd_s += time.perf_counter() - t0
    return factors, {"reduce_s": 0.0, "svd_s": svd_s, "reduce_bytes": received, "reduce_peak_mb": 0.0}


def _meta(opts: InitOptions, task: str, num_labels: int, info: dict, grads: _Gradients, times: dict, head) -> dict:
    from ..core.estimate import head_meta

    info0 = grads.infos[0]
    meta = build_meta(
        model=None,
        target_names=info0["names"],
        shapes={n: tuple(s) for n, s in info0["shapes"].items()},
        fingerprint=info0["fingerprint"],
        k=2 * opts.max_rank,
        num_examples=grads.total("examples"),
        num_targets=grads.total("targets"),
        seed=opts.seed,
        svd=opts.svd,
        niter=4,
        oversample=None,
        base_model=opts.model,
        dataset_fingerprint=info["dataset_fingerprint"],
        timings={k: round(v, 4) for k, v in times.items()},
        extra={
            "num_batches": grads.total("batches"),
            "num_tokens": grads.total("tokens"),
            "workers": opts.workers,
            "strategy": grads.decision.strategy,
            "driver_bytes_received": int(grads.reduce["reduce_bytes"]),
            "dataset": opts.data,
            "split": opts.split,
            "dataset_rows": info["dataset_rows"],
            "num_samples_requested": opts.num_samples,
            "task": task,
            "num_labels": num_labels if task == "seq-cls" else None,
            "label_names": info.get("label_names"),
            "max_length": opts.max_length,
            "model_dtype": opts.dtype,
            "batch_size": grads.decision.batch_size,
            **head_meta(head, opts.seed, grads.warmup),
        },
    )
    meta["model_class"] = info0["model_class"]
    return meta


def _summary(opts: InitOptions, info: dict, grads: _Gradients, plan: WorkerResources, times: dict, out,
             elapsed: float) -> dict:
    red = grads.reduce
    return {
        "out": out,
        "workers": opts.workers,
        "devices": sorted({i["device"] for i in grads.infos}),
        "nodes": len({i["node"] for i in grads.infos}),
        "gpus_per_worker": plan.gpus,
        "num_examples": grads.total("examples"),
        "num_targets": grads.total("targets"),
        "num_tokens": grads.total("tokens"),
        "num_batches": grads.total("batches"),
        "examples_per_worker": [r["examples"] for r in grads.results],
        "compute_s_per_worker": [round(r["seconds"], 3) for r in grads.results],  # forward+backward time only
        "dataset_rows": info["dataset_rows"],
        "sample_too_small": info["sample_too_small"],
        **{k: round(v, 3) for k, v in times.items()},
        "total_s": round(elapsed, 3),
        "tokens_per_s": round(grads.total("tokens") / max(times["gradient_s"], 1e-9), 1),
        "bytes_moved": int(info["sample_bytes"] + red["reduce_bytes"]),
        "sample_bytes": int(info["sample_bytes"]),
        "reduce_bytes": int(red["reduce_bytes"]),
        "reduce_peak_mb": round(red["reduce_peak_mb"], 2),
        "driver_peak_rss_mb": round(_peak_rss_mb(), 1),
        "retries": grads.retries,
        "strategy": grads.decision.strategy,
        "strategy_reason": grads.decision.reason,
        "micro_batch": grads.decision.batch_size,
        "planned_bytes_per_worker": grads.decision.per_worker_bytes,
        "driver_bytes_received": int(red["reduce_bytes"]),
        "memory_per_worker": grads.memory,
        "head_warmup": grads.warmup,
    }


def _num_labels(opts: InitOptions, task: str, max_label: int, names: list[str] | None = None) -> int:
    if task != "seq-cls":
        return 2  # unused by causal LMs
    if names:
        if opts.num_labels is not None and opts.num_labels != max(2, len(names)):
            raise ValueError(f"the data names {len(names)} classes but num_labels={opts.num_labels}; drop num_labels "
                             "(the class names decide it) or fix the data.")
        return max(2, len(names))
    if opts.num_labels is not None:
        if max_label >= opts.num_labels:
            raise ValueError(f"the data has label {max_label} but num_labels={opts.num_labels}; labels must be 0..num_labels-1.")
        return opts.num_labels
    return max(2, max_label + 1)


def format_summary(summary: dict) -> str:
    mb = 2**20
    lines = [
        f"examples {summary['num_examples']} ({summary['num_tokens']} tokens, {summary['num_targets']} targets) on "
        f"{summary['workers']} worker(s) {'/'.join(summary['devices'])}, {summary['nodes']} node(s); "
        f"per worker {summary['examples_per_worker']}",
        "time  " + "  ".join(f"{k[:-2]} {summary[k]:.2f}s" for k in ("read_s", "start_s", "head_warmup_s", "gradient_s", "reduce_s", "svd_s", "write_s") if k in summary)
        + f"  total {summary['total_s']:.2f}s  ({summary['tokens_per_s']:.0f} tokens/s)",
        f"moved {summary['bytes_moved'] / mb:.1f} MiB (sample {summary['sample_bytes'] / mb:.2f}, reduce {summary['reduce_bytes'] / mb:.1f}); "
        f"driver peak RSS {summary['driver_peak_rss_mb']:.0f} MiB, reduce buffers {summary['reduce_peak_mb']:.1f} MiB",
    ]
    if summary.get("memory_per_worker"):
        held = ", ".join(f"{m['param_bytes'] / mb:.1f}+{m['sum_bytes'] / mb:.1f}" for m in summary["memory_per_worker"])
        peaks = ", ".join(f"{(m['peak_device_bytes'] or m['peak_rss_bytes']) / mb:.0f}" for m in summary["memory_per_worker"])
        kind = "CUDA max allocated" if summary["memory_per_worker"][0]["peak_device_bytes"] is not None else "peak RSS"
        lines.append(f"strategy {summary['strategy']} ({summary['strategy_reason']}); per worker weights+sums MiB [{held}], "
                     f"{kind} MiB [{peaks}]; driver received {summary['driver_bytes_received'] / mb:.2f} MiB from the workers")
    if summary.get("head_warmup"):
        w = summary["head_warmup"]
        lines.append(f"head warm-up {w['steps']} steps of {w['batch_size']} at lr {w['lr']:g}: loss {w['loss_first']:.4f} -> "
                     f"{w['loss_last']:.4f}" + (f" in {summary['head_warmup_s']:.2f}s" if "head_warmup_s" in summary else ""))
    if summary.get("retries"):
        lines.append(f"retries {summary['retries']} (a gradient worker was lost and its stage rerun)")
    if summary.get("out"):
        lines.append(f"artifact -> {summary['out']}")
    return "\n".join(lines)
