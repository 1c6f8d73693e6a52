"""The init job's gradient workers: Ray actors that each hold the model and accumulate float32
sums of the target gradients over their stream of the sample, and the driver-side steps that
reserve and start them, run the stream with a progress bar, and check the counts."""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np
from ray.exceptions import ActorUnavailableError, ObjectLostError, RayActorError

from ..options import InitOptions
from .cluster import ClusterError
from .init_data import SAMPLE_INDEX, reraise_clean
from .resources import WorkerResources

POLL_S = 0.5  # how often the driver refreshes the progress bar
# a worker, or the objects it owns, gone: the gradient stage runs again (ObjectLostError covers OwnerDiedError)
LOST_ERRORS = (RayActorError, ActorUnavailableError, ObjectLostError)


class WorkerLostError(RuntimeError):
    """A gradient worker died (or hung) before it handed back its partial sums."""




class GradientWorker:
    """One gradient worker (a Ray actor): holds the model, streams batches, keeps float32 sums.

    ``probe`` tells the driver the device memory before anything is loaded; ``join`` enters the
    workers' torch.distributed group (sharded strategy); ``setup`` loads the model (so load errors
    come back as ordinary task errors) and, sharded, wraps it with FSDP2; ``consume`` runs the
    stream; ``progress`` answers while ``consume`` runs (the actor has two threads). Replicated,
    ``layer`` hands back one layer's whole partial sum and forgets it; sharded, ``svd_layer`` takes
    part in the distributed SVD of one layer and hands back only this rank's rows of its factors.
    """

    def __init__(self, model: str, task: str, num_labels: int, seed: int, target_modules, max_rank: int,
                 rank: int, dtype: str = "float32", allow_pickle_weights: bool = False):
        self.model_name, self.task, self.num_labels, self.seed, self.dtype = model, task, num_labels, seed, dtype
        self.target_modules, self.max_rank, self.rank = target_modules, max_rank, rank
        self.allow_pickle_weights = allow_pickle_weights
        self.examples = self.tokens = 0
        self.sums = {}
        self.sharded = None  # the ShardedAccumulator, sharded strategy only
        self.warm_steps = 0  # head warm-up steps done (worker 0, --head-warmup-steps)
        self._sum_bytes = 0

    def probe(self) -> dict:
        """The node and the memory a worker there may use: its GPU's, or on CPU the node's RAM."""
        import ray
        import torch

        cuda = torch.cuda.is_available()
        return {"node": ray.get_runtime_context().get_node_id(), "cuda": cuda,
                "device_bytes": int(torch.cuda.get_device_properties(0).total_memory if cuda
                                    else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))}

    def address(self) -> str:
        """A ``tcp://ip:port`` rendezvous on this worker's node (rank 0) for the process group."""
        import socket

        import ray

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def join(self, url: str, world: int, timeout_s: float) -> None:
        import datetime

        import torch
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(0)  # the actor sees its own GPU as device 0
        dist.init_process_group(backend, init_method=url, rank=self.rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))

    def setup(self, strategy: str = "replicated") -> dict:
        import socket

        import ray
        import torch

        from ..core.artifact import head_state, weight_fingerprint
        from ..core.estimate import check_rank_fits
        from ..models import load_model, load_tokenizer, resolve_model
        from ..core.targets import classifier_heads, find_target_modules

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        spec = resolve_model(self.model_name, self.task, allow_pickle_weights=self.allow_pickle_weights)
        self.model = load_model(spec, task=self.task, num_labels=self.num_labels, seed=self.seed,
                                dtype=getattr(torch, self.dtype)).to(self.device)
        self.pad_id = load_tokenizer(spec).pad_token_id
        self.names = find_target_modules(self.model, self.target_modules)
        shapes = check_rank_fits(self.model, self.names, self.max_rank)
        head = head_state(self.model, classifier_heads(self.model))  # the head the gradient goes through
        fingerprint = weight_fingerprint(self.model, self.names, head)  # of the whole weights, before any sharding
        if strategy == "sharded":
            from ..core.sharded import ShardedAccumulator

            self.sharded = ShardedAccumulator(self.model, self.names, pad_id=self.pad_id or 0,
                                              model_name=repr(self.model_name))
        return {
            "rank": self.rank,
            "node": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(self.device),
            "cpu_count": os.cpu_count() or 1,
            "names": list(self.names),
            "shapes": {n: list(s) for n, s in shapes.items()},
            "fingerprint": fingerprint,
            "model_class": type(self.model).__name__,
            "head": {n: t.numpy() for n, t in head.items()},
        }

    def warm_head(self, batches: list[dict], steps: int, lr: float, threads: int, batch_size: int) -> dict:
        """--head-warmup-steps, on one worker: fit the new head alone on the sample's collated
        ``batches``; returns the fitted head, the new fingerprint and the losses."""
        import torch

        from ..core.artifact import head_state
        from ..core.head import warm_up_head
        from ..core.targets import classifier_heads

        if self.device.type == "cpu":
            torch.set_num_threads(max(1, threads))
        heads = classifier_heads(self.model)
        self.warm_steps = 0
        stats = warm_up_head(self.model, batches, heads, steps=steps, lr=lr, device=self.device,
                             on_step=lambda step: setattr(self, "warm_steps", step), batch_size=batch_size)
        head = head_state(self.model, heads)
        return {"head": {n: t.numpy() for n, t in head.items()}, "fingerprint": self._fingerprint(head), "stats": stats}

    def set_head(self, head: dict) -> str:
        """Put another worker's fitted head into this one's model; returns the new fingerprint."""
        import torch

        from ..core.artifact import head_state
        from ..core.targets import classifier_heads

        with torch.no_grad():
            for name, value in head.items():
                p = self.model.get_parameter(name)
                p.copy_(torch.as_tensor(value).to(p.device, p.dtype))
        return self._fingerprint(head_state(self.model, classifier_heads(self.model)))

    def _fingerprint(self, head) -> str:
        from ..core.artifact import weight_fingerprint

        return weight_fingerprint(self.model, self.names, head)

    def memory(self) -> dict:
        """What this worker held: tensor bytes of its parameters and float32 sums, and its peak
        (CUDA: max allocated; CPU: the process's peak RSS)."""
        import resource

        import torch

        if self.sharded is not None:
            held = self.sharded.held_bytes()
        else:
            held = {"param_bytes": int(sum(p.numel() * p.element_size() for p in self.model.parameters())),
                    "sum_bytes": int(self._sum_bytes)}
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        cuda = torch.cuda.is_available()
        return {"rank": self.rank, **held, "peak_rss_bytes": int(peak_rss),
                "peak_device_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None}

    def consume(self, stream, batch_size: int, threads: int) -> dict:
        import torch

        from ..data import collate
        from ..core.gradients import GradientAccumulator

        if self.device.type == "cpu":
            torch.set_num_threads(max(1, threads))
        if self.sharded is not None:
            return self._consume_sharded(stream, batch_size)
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
            result = acc.sums()
        self.sums = result.sums
        self._sum_bytes = sum(t.numel() * t.element_size() for t in self.sums.values())
        return self._counts(result, seen)

    def _counts(self, result, seen: list) -> dict:
        return {
            "rank": self.rank,
            "examples": result.num_examples,
            "targets": result.num_targets,
            "tokens": self.tokens,
            "batches": result.num_batches,
            "seconds": result.seconds,
            "ids": np.concatenate(seen) if seen else np.zeros(0, dtype=np.int64),
        }

    def _consume_sharded(self, stream, batch_size: int) -> dict:
        """Lockstep over the ranks: one step per batch of the longest stream (see core.sharded)."""
        from ..data import collate

        acc, seen = self.sharded, []
        it = iter(stream.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=1)) \
            if stream is not None else iter(())
        while True:
            batch = next(it, None)
            tensors = None
            if batch is not None:
                tensors = collate({"input_ids": batch["input_ids"], "labels": batch["labels"]}, self.pad_id, self.task)
                tokens = int(tensors["attention_mask"].sum())
                tensors = {k: v.to(acc.device, non_blocking=True) for k, v in tensors.items()}
            if not acc.step(tensors):
                break
            if batch is not None:
                seen.append(np.asarray(batch[SAMPLE_INDEX], dtype=np.int64))
                self.examples += len(seen[-1])
                self.tokens += tokens
        return self._counts(acc.local_sums(), seen)

    def svd_layer(self, name: str, k: int, num_targets: int, exact: bool, seed: int) -> dict:
        """One layer's distributed SVD (every rank calls it for the same layer): this rank's rows
        of the row-sharded factor, and on rank 0 the singular values and the other factor. The
        layer's sums are released."""
        import torch
        import torch.distributed as dist

        from ..core.gradients import GradientError, check_finite
        from ..core.sharded_svd import sharded_svd

        g = self.sharded.sums.pop(name).div_(num_targets)
        finite = bool(torch.isfinite(g).all())
        bad = torch.tensor([float(not finite)], device=g.device)
        dist.all_reduce(bad)  # every rank stops together, or none does (a lone raise would hang the others)
        if bad.item():
            check_finite(name, g)  # (raises on the ranks whose rows hold the NaN/Inf)
            raise GradientError(f"the gradient of layer {name!r} has NaN/Inf entries in another worker's rows; "
                                "see that worker's error for the count and the fix.")
        rows, S, other = sharded_svd(g, k, seed=seed, exact=exact)
        del g
        out = {"rows": rows.cpu().numpy(), "transposed": self.sharded.transposed[name]}
        if self.rank == 0:
            out |= {"S": S.cpu().numpy(), "other": other.cpu().numpy()}
        return out

    def progress(self) -> tuple[int, int]:
        return self.examples, self.tokens

    def warm_progress(self) -> int:
        return self.warm_steps

    def layer(self, name: str) -> np.ndarray:
        return self.sums.pop(name).cpu().numpy()


def reserve(plan: WorkerResources):
    """A placement group holding every worker's bundle (all start together, or none does)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    workers, bundle = plan.workers, plan.bundle()
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


def start_workers(opts: InitOptions, plan: WorkerResources, pg, task: str, num_labels: int, *, choose=None,
                  make_streams=None) -> tuple[list, list[dict], object, object]:
    """Create the actors, decide the strategy from what they report (``choose(probes)`` returns a
    ``Decision``; None: replicated), let ``make_streams(decision)`` start the data stream while the
    model loads, join the workers' process group (sharded), and load the model in each; checks
    they all hold the same weights. Returns ``(workers, infos, decision, streams)``."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    actor = ray.remote(GradientWorker)
    workers = []
    for i in range(opts.workers):
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
        workers.append(actor.options(num_cpus=plan.cpus, num_gpus=plan.gpus, max_concurrency=2,
                                     scheduling_strategy=strategy).remote(
            opts.model, task, num_labels, opts.seed, opts.target_modules, opts.max_rank, i, opts.dtype,
            opts.allow_pickle_weights))
    try:
        decision = choose(ray.get([w.probe.remote() for w in workers])) if choose is not None else None
        sharded = decision is not None and decision.strategy == "sharded"
        streams = make_streams(decision) if make_streams is not None else None
        if sharded:
            url = ray.get(workers[0].address.remote())
            ray.get([w.join.remote(url, len(workers), opts.stall_timeout + 60) for w in workers])
        infos = ray.get([w.setup.remote("sharded" if sharded else "replicated") for w in workers])
    except LOST_ERRORS as e:
        kill_workers(workers)
        raise WorkerLostError(f"a gradient worker died while loading {opts.model!r}: {str(e).splitlines()[0]}") from e
    except Exception as e:
        kill_workers(workers)
        reraise_clean(e)
    prints = {info["fingerprint"] for info in infos}
    if len(prints) > 1:
        kill_workers(workers)
        hosts = sorted({info["host"] for info in infos})
        raise RuntimeError(
            f"the gradient workers loaded different weights for {opts.model!r} (hosts {hosts}); every node must "
            "see the same model files: install them in the cluster's setup or use shared storage."
        )
    return workers, infos, decision, streams


def warm_heads(workers, infos: list[dict], batches: list[dict], opts: InitOptions) -> dict:
    """--head-warmup-steps: worker 0 fits the new head on the whole sample, every other worker
    takes that head, and all must then hold the same weights again. Updates ``infos`` (the head
    and fingerprint the artifact records); returns the warm-up's stats. A worker that finishes
    no step for ``opts.stall_timeout`` seconds counts as lost, as in the gradient stage."""
    import ray

    steps = opts.head_warmup_steps
    ref = workers[0].warm_head.remote(batches, steps, opts.head_warmup_lr, torch_threads(infos), opts.batch_size)
    bar = None
    if opts.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="head warm-up", unit="step", dynamic_ncols=True)
    last, since = -1, time.perf_counter()
    try:
        while not ray.wait([ref], timeout=POLL_S)[0]:
            done = ray.get(workers[0].warm_progress.remote(), timeout=max(POLL_S, opts.stall_timeout))
            if done != last:
                last, since = done, time.perf_counter()
            elif time.perf_counter() - since > opts.stall_timeout:
                raise WorkerLostError(f"gradient worker 0 finished no head warm-up step in {opts.stall_timeout:.0f}s "
                                      f"(at step {done} of {steps})")
            if bar is not None:
                bar.n = done
                bar.refresh()
        got = ray.get(ref)
        if bar is not None:
            bar.n = steps
            bar.refresh()
        prints = ray.get([w.set_head.remote(got["head"]) for w in workers[1:]])
    except WorkerLostError:
        raise
    except LOST_ERRORS as e:
        raise WorkerLostError(f"a gradient worker died during the head warm-up: {str(e).splitlines()[0]}") from e
    except Exception as e:
        reraise_clean(e)
    finally:
        if bar is not None:
            bar.close()
    if any(p != got["fingerprint"] for p in prints):
        raise RuntimeError("the gradient workers hold different weights after taking worker 0's warmed-up head; "
                           "this is a bug, please report it.")
    for info in infos:
        info["head"], info["fingerprint"] = got["head"], got["fingerprint"]
    return got["stats"]


def kill_workers(workers) -> None:
    import ray

    for w in workers:
        with contextlib.suppress(Exception):
            ray.kill(w, no_restart=True)


def torch_threads(infos: list[dict]) -> int:
    """Torch threads for a CPU worker: the node's cores shared among the workers on it."""
    per_node = {}
    for info in infos:
        per_node.setdefault(info["node"], []).append(info["cpu_count"])
    return max(1, min(cores[0] // len(cores) for cores in per_node.values()))


def run_gradient(workers, infos, streams, opts: InitOptions, total: int) -> list[dict]:
    """Stream the sample through the workers; returns each worker's counts and sample indices.

    A worker that dies (or whose results are lost with their owner) raises WorkerLostError; so
    does one that is alive but finishes no batch for ``opts.stall_timeout`` seconds (a hung
    device, a deadlock): the caller kills the workers and runs the stage again, or fails."""
    import ray

    threads = torch_threads(infos)
    refs = [w.consume.remote(s, opts.batch_size, threads) for w, s in zip(workers, streams)]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[dict | None] = [None] * len(refs)
    bar = None
    if opts.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"gradient ({len(workers)} worker{'s' if len(workers) > 1 else ''})",
                   unit="ex", dynamic_ncols=True)
    t0 = time.perf_counter()
    seen = [(-1, t0)] * len(workers)  # per worker: examples last seen, and when that count last grew
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
            for ref in done:
                i = index[ref]
                try:
                    results[i] = ray.get(ref)
                except LOST_ERRORS as e:
                    raise WorkerLostError(f"gradient worker {i} ({infos[i]['host']}, pid {infos[i]['pid']}) died "
                                          f"mid-stream: {str(e).splitlines()[0]}") from e
                except Exception as e:
                    reraise_clean(e)
            examples, tokens = _progress(workers, results, seen, infos, opts.stall_timeout)
            if bar is not None:
                bar.n = examples
                bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f}", refresh=False)
                bar.refresh()
    finally:
        if bar is not None:
            bar.close()
    return results


def _progress(workers, results, seen, infos, stall_timeout: float) -> tuple[int, int]:
    """(examples, tokens) done so far; raises WorkerLostError for a worker stalled too long."""
    import ray

    done = [r for r in results if r is not None]
    examples, tokens = sum(r["examples"] for r in done), sum(r["tokens"] for r in done)
    asks = {i: w.progress.remote() for i, w in enumerate(workers) if results[i] is None}
    ready, _ = ray.wait(list(asks.values()), num_returns=len(asks), timeout=1.0)
    now = time.perf_counter()
    for i, ask in asks.items():
        if ask in ready:
            with contextlib.suppress(Exception):  # a dead worker is reported by its consume call
                e_i, t_i = ray.get(ask)
                examples, tokens = examples + e_i, tokens + t_i
                if e_i > seen[i][0]:
                    seen[i] = (e_i, now)
        if now - seen[i][1] > stall_timeout:
            raise WorkerLostError(
                f"gradient worker {i} ({infos[i]['host']}, pid {infos[i]['pid']}) is alive but finished no batch for "
                f"{stall_timeout:g}s (--stall-timeout): stuck (a hung device, a deadlock, a stopped process)"
            )
    return examples, tokens


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


