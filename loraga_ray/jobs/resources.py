"""What each worker of a job reserves on the Ray cluster, checked against what the cluster has.

One planner for the gradient workers of ``init`` and the Train workers of ``train`` / ``tune``:
it decides CPU or GPU, fails at once with the numbers when an embedded (local) Ray can never give
what is asked, and on a joined cluster, which may autoscale, warns and leaves the wait to the
placement group (with a timeout for ``init``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .cluster import ClusterError, joins_cluster

log = logging.getLogger(__name__)

_CUDA_PROBES: dict[float, dict] = {}


@dataclass
class WorkerResources:
    """Per-worker reservation of one job's ``workers`` workers."""

    workers: int
    gpus: float
    cpus: float
    timeout: float  # seconds to wait for the reservation (an autoscaling cluster may add nodes)
    cuda: bool = False  # the workers compute on CUDA (NCCL); False: CPU + gloo (probed on request)
    gpu_memory: int | None = None  # bytes of one worker's GPU (probed with cuda)
    bf16: bool = False  # that GPU computes in bfloat16

    def bundle(self) -> dict[str, float]:
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus > 0 else {})}

    def scaling_config(self):
        """Ray Train's ScalingConfig for these workers."""
        from ray.train import ScalingConfig

        return ScalingConfig(num_workers=self.workers, use_gpu=self.gpus > 0, resources_per_worker=self.bundle())


def probe_gpu(gpus_per_worker: float) -> dict:
    """What a task holding ``gpus_per_worker`` GPUs sees: ``cuda`` (logical GPUs on a CPU machine
    have none), its device's ``memory`` in bytes and ``bf16`` support. The driver's own view
    answers when it has CUDA; otherwise a probe task (once per process and size)."""
    import torch

    def look() -> dict:
        import torch as _t

        if not _t.cuda.is_available():
            return {"cuda": False, "memory": None, "bf16": False}
        return {"cuda": True, "memory": int(_t.cuda.get_device_properties(0).total_memory),
                "bf16": bool(_t.cuda.is_bf16_supported())}

    if torch.cuda.is_available():
        return look()
    key = float(min(gpus_per_worker, 1.0))
    if key not in _CUDA_PROBES:
        import ray

        try:
            _CUDA_PROBES[key] = ray.get(ray.remote(num_cpus=0, num_gpus=key)(look).remote(), timeout=120)
        except Exception as e:  # no node can take the task
            log.warning("could not probe GPU workers for CUDA (%s); computing on CPU.", e)
            _CUDA_PROBES[key] = {"cuda": False, "memory": None, "bf16": False}
    return _CUDA_PROBES[key]


def workers_see_cuda(gpus_per_worker: float) -> bool:
    """Whether a task holding ``gpus_per_worker`` GPUs sees a CUDA device."""
    return bool(probe_gpu(gpus_per_worker)["cuda"])


def plan_workers(what: str, workers: int, *, gpus_per_worker: float | None, cpus_per_worker: float,
                 address: str | None, device: str = "auto", spare_cpus: float = 0.0,
                 resource_timeout: float | None = None, probe_cuda: bool = False,
                 can_wait: bool = True) -> WorkerResources:
    """The reservation of ``workers`` workers (``what`` names them in messages). Ray must be
    initialised.

    GPUs per worker: 0 with ``device="cpu"``, else ``gpus_per_worker``, else 1 when the cluster
    has GPUs (or ``device="cuda"``). ``spare_cpus`` stay free for Ray Data's tasks. Without
    ``can_wait`` (Ray Train, whose reservation has no timeout) a request beyond what a joined
    cluster has now is an error too, instead of a wait for the autoscaler."""
    import ray

    total = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    have_gpu, have_cpu = float(total.get("GPU", 0)), float(total.get("CPU", 0))
    if device == "cpu":
        gpus = 0.0
    elif gpus_per_worker is not None:
        gpus = float(gpus_per_worker)
    else:
        gpus = 1.0 if (have_gpu >= 1 or device == "cuda") else 0.0
    if device == "cuda" and gpus == 0:
        raise ValueError("--device cuda with --gpus-per-worker 0: pass a positive --gpus-per-worker.")
    cpus = float(cpus_per_worker)
    node_gpu = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    node_cpu = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    spare = f" plus {spare_cpus:g} for Ray Data" if spare_cpus else ""
    problems = []
    if gpus > 0 and workers * gpus > have_gpu + 1e-9:
        problems.append(f"{workers} workers x {gpus:g} GPU = {workers * gpus:g} GPUs, the cluster has {have_gpu:g}")
    elif gpus > node_gpu + 1e-9:
        problems.append(f"{gpus:g} GPUs per worker, the largest node has {node_gpu:g}")
    if workers * cpus + spare_cpus > have_cpu + 1e-9:
        problems.append(f"{workers} workers x {cpus:g} CPU = {workers * cpus:g} CPUs{spare}, the cluster has {have_cpu:g}")
    elif cpus > node_cpu + 1e-9:
        problems.append(f"{cpus:g} CPUs per worker, the largest node has {node_cpu:g}")
    joined = joins_cluster(address)
    timeout = resource_timeout if resource_timeout is not None else (600.0 if joined else 60.0)
    if problems and (not joined or not can_wait):
        raise ClusterError(
            f"the {what} ask for more than this Ray {'cluster' if joined else 'instance'} has: " + "; ".join(problems) + ". "
            "Lower --workers, --gpus-per-worker (0 runs on CPU) or --cpus-per-worker, or join a larger cluster "
            "with --address."
        )
    if problems:
        log.warning("the cluster has too little for the %s right now (%s); waiting for the autoscaler",
                    what, "; ".join(problems))
    cuda, gpu = False, {}
    if probe_cuda and gpus > 0:
        gpu = probe_gpu(gpus)
        cuda = bool(gpu["cuda"])
        if device == "cuda" and not cuda:
            raise ClusterError("--device cuda, but the GPU workers see no CUDA device. Check the drivers, or use --device cpu.")
        if not cuda:
            log.warning("the cluster's GPUs are logical (workers see no CUDA device): the %s compute on CPU with gloo.", what)
    return WorkerResources(workers=workers, gpus=gpus, cpus=cpus, timeout=timeout, cuda=cuda,
                           gpu_memory=gpu.get("memory") if cuda else None, bf16=bool(gpu.get("bf16")))
