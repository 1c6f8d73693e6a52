"""The training loop of one Ray Train worker (``train_loop_per_worker`` of the TorchTrainer), or of
a single-worker CPU trial in its own process (:mod:`loraga_ray.training.local`): the loop sees
only a :class:`Session`.

The model is held as :mod:`loraga_ray.training.strategy` says (DDP or FSDP2, the base in
``--dtype``, optional activation checkpointing). Per step: the learning rate of the schedule
(linear warm-up, cosine decay), forward and backward under autocast in the base's dtype,
gradient clipping, AdamW on float32 master copies; evaluation every ``eval_every`` steps
and at the end; a checkpoint every ``checkpoint_every`` steps (default: at evaluations) and at
the end, where rank 0 also writes the deliverable into the checkpoint. Reports (to Ray Train, or
the in-process session's callbacks) are batched (see :meth:`WorkerRun.report_due`)."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..core.targets import CLASSIFIER_HEADS
from ..options import TrainOptions
from .build import artifact_from_payload, build_model
from .checkpoints import load_checkpoint, save_checkpoint, trainable_parameters, write_deliverable
from .evaluate import evaluate, to_device
from .strategy import autocast_for, full_tensor, prepare


class DivergedError(ValueError):
    """The loss or the gradient norm is NaN or infinite: training cannot continue."""


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the base lr for update number ``step`` (0-based): linear warmup to 1 over
    ``warmup`` updates, then cosine decay towards 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_steps(warmup_ratio: float, total: int) -> int:
    return int(math.ceil(warmup_ratio * total))


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one step on one worker (dropout): the same after a resume."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1)


def say(msg: str) -> None:
    """One progress line from a worker. sys.stdout.write, not print: Ray Train patches print
    into its logger, which shows every line twice on the driver."""
    sys.stdout.write(f"[loraga-ray train] {msg}\n")
    sys.stdout.flush()


STALLED_EXIT_CODE = 75  # a Train worker that ended itself: no step finished for --stall-timeout
FIRST_STEP_GRACE_S = 300.0  # the first step also waits for the data stream and the collectives to start


class StepWatchdog:
    """Ends this Train worker's process when it finishes no step for ``timeout`` seconds.

    Ray Train's health check asks the worker's actor, which answers while its training thread
    is stuck (a hung device, a data stream that never delivers, a collective waiting for a rank
    that is gone): only the training loop itself knows it makes no progress. A stuck thread cannot
    be interrupted, so the watchdog prints why and exits the process; Ray Train then sees a lost
    worker and restarts the group from the last checkpoint (``--max-failures``) or ends the run.
    Under DDP/FSDP the other ranks, blocked in a collective with the stuck one, stop beating too
    and end the same way. The first step gets ``FIRST_STEP_GRACE_S`` more."""

    def __init__(self, timeout: float, rank: int):
        import threading

        self.timeout, self.rank = float(timeout), rank
        self.deadline = time.monotonic() + self.timeout + FIRST_STEP_GRACE_S
        self.step = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="loraga-step-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int | None = None) -> None:
        if step is not None:
            self.step = step
        self.deadline = time.monotonic() + self.timeout

    @contextlib.contextmanager
    def paused(self):
        """No deadline inside (a checkpoint: rank 0 writes and uploads it while the other ranks wait
        for it in Ray Train's report, for as long as the storage takes); the clock restarts after."""
        self.deadline = float("inf")
        try:
            yield
        finally:
            self.beat()

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            if time.monotonic() > self.deadline:
                say(f"worker rank {self.rank} finished no step for {self.timeout:g}s after step {self.step} "
                    "(--stall-timeout): it is stuck (a hung device, a data stream that never delivers, or a "
                    "collective waiting for a lost rank). Ending this worker so that Ray Train (or, for an "
                    "in-process trial, Tune) restarts it from the last checkpoint (--max-failures) or ends the run.")
                sys.stderr.flush()
                os._exit(STALLED_EXIT_CODE)


def is_head_parameter(name: str, heads) -> bool:
    """Whether a trainable parameter belongs to a new classifier head: ``classifier.weight`` of a
    fully fine-tuned model, ``base_model.model.classifier.modules_to_save.default.weight`` of a
    PEFT one (heads are top-level modules of the plain model)."""
    name = name.removeprefix("base_model.model.")
    return name.split(".", 1)[0] in heads


def param_groups(named, opts: TrainOptions, heads) -> list[dict]:
    """AdamW's parameter groups: the adapter (or every weight under full fine-tuning) at --lr and
    the new classifier heads at --head-lr (default --lr). Each group keeps its peak lr in
    ``peak_lr``; the schedule scales it. The groups are the same for every --init."""
    head_lr = opts.head_lr if opts.head_lr is not None else opts.lr
    body = [p for n, p in named if not is_head_parameter(n, heads)]
    head = [p for n, p in named if is_head_parameter(n, heads)]
    groups = [{"params": body, "lr": opts.lr, "peak_lr": opts.lr, "name": "adapter"}]
    if head:
        groups.append({"params": head, "lr": head_lr, "peak_lr": head_lr, "name": "head"})
    return groups


class Session:
    """What the loop needs from whatever runs it: its rank, its device, its data, its last
    checkpoint, and where its reports go. :class:`RayTrainSession` is a Ray Train worker's;
    :class:`loraga_ray.training.local.LocalSession` runs a single-worker CPU run in the calling
    process (a search's trials, without a Train controller and worker to start per trial)."""

    rank: int = 0
    world: int = 1

    def device(self, cuda: bool) -> torch.device:
        raise NotImplementedError

    def checkpoint(self):
        """The latest checkpoint (``.as_directory()``) to resume from, or None."""
        raise NotImplementedError

    def dataset(self, name: str):
        """The named data stream (``.iter_batches(...)``)."""
        raise NotImplementedError

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        """Hand on a report, with the checkpoint written into ``checkpoint_dir`` (None: none); the
        folder is removed after this returns."""
        raise NotImplementedError


class RayTrainSession(Session):
    """The loop inside a Ray Train worker: ``ray.train``'s context, shards, checkpoints and reports."""

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def device(self, cuda: bool) -> torch.device:
        import ray.train.torch

        device = ray.train.torch.get_device() if cuda else torch.device("cpu")
        return device[0] if isinstance(device, list) else device

    def checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def dataset(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        import ray.train
        from ray.train import Checkpoint

        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None)


class WorkerRun:
    """The state of one worker's run: model, optimizer, where it resumed, what it reported."""

    def __init__(self, config: dict, session: "Session | None" = None):
        import ray

        from ..models import load_tokenizer

        self.session = session = session or RayTrainSession()
        self.config, self.opts = config, TrainOptions(**config["options"])
        self.task, self.total = config["task"], config["total_steps"]
        self.rank, self.world = session.rank, session.world
        self.device = session.device(config["cuda"])
        if self.device.type == "cpu":
            # as many compute threads as the worker reserved CPUs: torch's default (every core) makes
            # workers (or trials) that share a machine spin against each other
            torch.set_num_threads(max(1, int(self.opts.cpus_per_worker)))
        # decided on the driver before any worker started (jobs.train_strategy.decide_train)
        self.dtype, self.strategy = config["dtype"], config["train_strategy"]
        self.sharded = self.strategy == "fsdp" and self.world > 1
        self.autocast = autocast_for(self.device, self.dtype)
        self.tokenizer = load_tokenizer(config["spec"])
        artifact = artifact_from_payload(ray.get(config["artifact_ref"])) if config.get("artifact_ref") is not None else None
        torch.manual_seed(self.opts.seed)
        self.label_names = config.get("label_names")
        model = build_model(self.opts, config["spec"], self.task, config["num_labels"], artifact, dtype=self.dtype,
                            label_names=self.label_names, device=None if self.sharded else self.device,
                            restarting=session.checkpoint() is not None,
                            report=say if self.rank == 0 else None,
                            estimate_sample=ray.get(config["estimate_sample_ref"])
                            if config.get("estimate_sample_ref") is not None else None)
        del artifact
        self.model = prepare(model, strategy=self.strategy, device=self.device, dtype=self.dtype,
                             activation_checkpointing=self.opts.activation_checkpointing, world=self.world)
        named = trainable_parameters(self.model)
        self.params = [p for _, p in named]
        self.optimizer = torch.optim.AdamW(param_groups(named, self.opts, CLASSIFIER_HEADS if self.task == "seq-cls" else ()),
                                           lr=self.opts.lr, weight_decay=self.opts.weight_decay)
        self.per_worker = self.opts.batch_size // self.world
        self.start_step, self.history, self.eval_batches = 0, [], None
        self.last_report = self.t_start = time.perf_counter()
        self.last_reported_step = 0
        self.report_interval = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0))
        self.on_progress = None  # called for progress other than a finished step (the watchdog's beat)

    def resume(self) -> None:
        """Continue from the run's latest checkpoint, if there is one."""
        checkpoint = self.session.checkpoint()
        if checkpoint is None:
            return
        with checkpoint.as_directory() as d:
            state = load_checkpoint(Path(d), self.model, self.optimizer)
        self.start_step, self.history = int(state["step"]), list(state["history"])
        self.last_reported_step = self.start_step
        if self.rank == 0:
            say(f"resuming from step {self.start_step} of {self.total}")

    def batches(self):
        """(step, raw batch) of the steps still to run: the run's fixed stream, with the steps
        consumed before the checkpoint skipped."""
        shard = self.session.dataset("train")
        for i, raw in enumerate(shard.iter_batches(batch_size=self.per_worker, batch_format="numpy", prefetch_batches=1)):
            step = i + 1
            if step > self.total:
                return
            if step <= self.start_step:
                if self.on_progress is not None:
                    self.on_progress()  # skipping the steps a resumed run already did is progress too
                continue
            if step == self.start_step + 1:
                self.t_start = time.perf_counter()  # the rate counts training, not start-up
            yield step, raw

    def train_step(self, step: int, raw: dict) -> dict:
        """One optimizer step; the loss and gradient norm are averaged over the workers."""
        from ..data import collate

        opts = self.opts
        factor = lr_factor(step - 1, self.total, self.config["warmup_steps"])
        lr = opts.lr * factor
        for g in self.optimizer.param_groups:
            g["lr"] = g["peak_lr"] * factor
        torch.manual_seed(step_seed(opts.seed, step, self.rank))  # dropout: the same after a resume
        self.model.train()
        batch = to_device(collate(raw, self.tokenizer.pad_token_id, self.task), self.device)
        with self.autocast():
            loss = self.model(**batch).loss
        loss.backward()
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.params, opts.max_grad_norm if opts.max_grad_norm > 0
                                                               else float("inf")))  # a DTensor under FSDP
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # Rank 0 decides when enough time has passed for a report; the all-reduce tells every worker.
        report_time = float(self.rank == 0 and opts.report_every is None
                            and time.perf_counter() - self.last_report >= self.report_interval)
        stats = torch.tensor([float(loss.detach()), float(grad_norm), report_time], dtype=torch.float64, device=loss.device)
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(stats)
            stats[:2] /= self.world
        self.report_time = bool(stats[2] > 0)
        if not (math.isfinite(float(stats[0])) and math.isfinite(float(stats[1]))):
            raise DivergedError(
                f"step {step}: the {'loss' if not math.isfinite(float(stats[0])) else 'gradient norm'} is "
                f"{float(stats[0]) if not math.isfinite(float(stats[0])) else float(stats[1])} (lr {lr:.3g}, --init "
                f"{opts.init}). The run stopped here and nothing was exported. The likely cause is a learning rate too "
                "high for this init (LoRA-GA's first steps are full fine-tuning's: it wants an lr about 10x lower than "
                "plain LoRA's); lower --lr and start again."
            )
        return {"step": step, "train_loss": float(stats[0]), "lr": lr, "grad_norm": float(stats[1]),
                "epoch": step / self.config["steps_per_epoch"],
                "elapsed_s": time.perf_counter() - self.t_start}  # seconds of training (and evaluation) so far

    def evaluate(self) -> dict:
        """Eval metrics; each worker evaluates every world-th batch of the eval rows."""
        from ..data import Encoder, collate, group_by_length

        if self.eval_batches is None:
            self.eval_batches = []
            encoder = Encoder(self.tokenizer, self.task, max_length=self.opts.max_length)
            size = max(self.per_worker, 8)
            rows = self.session.dataset("eval").iter_batches(batch_size=size, batch_format="numpy")
            if self.task == "seq-cls":  # batches of alike lengths pad far less
                rows = group_by_length([encoder(eraw) for eraw in rows], size)
            for j, eraw in enumerate(rows):
                if j % self.world == self.rank:
                    encoded = eraw if self.task == "seq-cls" else encoder(eraw)
                    batch = collate(encoded, self.tokenizer.pad_token_id, self.task)
                    self.eval_batches.append((batch, list(eraw.get("response", []))))
        return evaluate(self.model, self.eval_batches, self.task, self.device, self.autocast, self.tokenizer, self.world,
                        on_batch=self.on_progress, lockstep=self.sharded)

    def print_progress(self, metrics: dict) -> None:
        step = metrics["step"]
        if self.rank != 0 or not (step % max(1, self.total // 20) == 0 or step == self.total or "eval_loss" in metrics):
            return
        rate = (step - self.start_step - 1) / max(time.perf_counter() - self.t_start, 1e-9)
        extra = "".join(f" {k} {v:.4f}" for k, v in metrics.items() if k.startswith("eval_"))
        say(f"step {step}/{self.total} loss {metrics['train_loss']:.4f} lr {metrics['lr']:.2e}{extra} ({rate:.2f} step/s)")

    def report_due(self, metrics: dict, checkpoint_now: bool) -> bool:
        """Reports are batched: Ray Train's controller takes one report per poll (every
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default), so a report every step would throttle
        training. A report comes at every checkpoint and evaluation, every ``report_every`` steps,
        or when rank 0 says ~2 s have passed."""
        every = self.opts.report_every
        return (checkpoint_now or "eval_loss" in metrics or self.report_time
                or (every is not None and metrics["step"] % every == 0))

    def report(self, metrics: dict, checkpoint_now: bool) -> None:
        """Report the steps since the last report (their mean train loss, and each step's row);
        with a checkpoint (rank 0 writes it, and at the end the deliverable) when due."""
        step, done = metrics["step"], bool(metrics.get("done"))
        window = self.history[len(self.history) - (step - self.last_reported_step):]
        report = dict(metrics, train_loss=float(np.mean([h["train_loss"] for h in window])), step_metrics=window)
        tmp = None
        if checkpoint_now and (self.rank == 0 or self.sharded):  # under FSDP every rank writes its shards
            tmp = Path(tempfile.mkdtemp(prefix="loraga-ckpt-"))
            save_checkpoint(tmp, self.model, self.optimizer,
                            {"step": step, "total_steps": self.total, "history": self.history, "done": done,
                             "init": self.opts.init, "seed": self.opts.seed, "train_strategy": self.strategy,
                             "dtype": self.dtype, "label_names": self.label_names}, rank=self.rank, world=self.world,
                            sharded=self.sharded)
        if checkpoint_now and done and tmp is not None:
            write_deliverable(tmp, self.model, self.opts.init, self.tokenizer, rank=self.rank,  # gathers under FSDP
                              label_names=self.label_names)
        try:
            self.session.report(report, tmp)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        self.last_reported_step, self.last_report = step, time.perf_counter()


def train_loop_per_worker(config: dict) -> None:
    """``train_loop_per_worker`` of the TorchTrainer (see :func:`loraga_ray.jobs.train.build_trainer`
    for ``config``)."""
    run_loop(config, RayTrainSession())


def run_loop(config: dict, session: "Session") -> None:
    """The whole loop of one worker: build, resume, train, evaluate, report, under the watchdog."""
    run = WorkerRun(config, session)
    run.resume()
    watchdog = StepWatchdog(run.opts.stall_timeout, run.rank)
    run.on_progress = watchdog.beat
    try:
        _steps(run, watchdog)
    finally:
        watchdog.close()


def is_early_eval(step: int, opts: TrainOptions) -> bool:
    """An evaluation of --eval-early-every K over the first --eval-early-until steps."""
    return bool(opts.eval_early_every) and step <= opts.eval_early_until and step % opts.eval_early_every == 0


def _steps(run: WorkerRun, watchdog: StepWatchdog) -> None:
    opts, total = run.opts, run.total
    checkpoint_every = opts.checkpoint_every or opts.eval_every
    for step, raw in run.batches():
        metrics = run.train_step(step, raw)
        watchdog.beat(step)
        done = step == total
        stopping = opts.stop_after is not None and step >= opts.stop_after and not done
        if step % opts.eval_every == 0 or done or is_early_eval(step, opts):
            metrics.update(run.evaluate())
            watchdog.beat()
        if done:
            metrics["done"] = True
        run.history.append(metrics)
        run.print_progress(metrics)
        checkpoint_now = step % checkpoint_every == 0 or done or stopping
        if run.report_due(metrics, checkpoint_now):
            with watchdog.paused():
                run.report(metrics, checkpoint_now)
        if stopping:
            if run.rank == 0:
                say(f"stopped after step {step} as asked; continue with --resume")
            return
