"""Connecting to Ray: an embedded local instance by default, a cluster when an address is given."""

from __future__ import annotations

import os
import socket

REACH_TIMEOUT_S = 10.0  # how long connect() waits for a TCP answer from the cluster address


class ClusterError(RuntimeError):
    """Ray could not be reached or cannot give what the job asks for."""


def joins_cluster(address: str | None) -> bool:
    """Whether a job with this ``--address`` joins a running cluster (the address, or
    ``RAY_ADDRESS``) rather than starting an embedded local Ray, which cannot grow."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def connect(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
            min_cpus: int | None = None, quiet: bool = False, runtime_env: dict | None = None,
            logging_level: int | None = None):
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start an embedded local Ray whose
    dashboard listens on 127.0.0.1 only. Returns the ``ray`` module, initialised.

    ``num_cpus`` / ``num_gpus`` size the embedded instance; ``min_cpus`` gives it at least that
    many logical CPUs (and at least one per core): Train workers, Tune trials and Ray Data tasks
    must not starve each other. All three are ignored when joining a cluster. ``logging_level``:
    that of Ray's own driver-side logger (default Ray's, INFO)."""
    import ray

    if ray.is_initialized():
        return ray
    if min_cpus is not None:
        num_cpus = max(num_cpus or 0, os.cpu_count() or 1, int(min_cpus))
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(log_to_driver=not quiet, runtime_env=runtime_env)
    if logging_level is not None:
        kwargs["logging_level"] = logging_level
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, **kwargs)
        except Exception as e:  # ConnectionError, TimeoutError, ValueError depending on the form
            raise ClusterError(
                f"could not connect to the Ray cluster at {address!r}: {e}. Check that the head node is up "
                "(`ray status` on it), the address is host:port of its GCS (default port 6379) or "
                "ray://host:10001 for Ray Client, and that this machine can reach it; "
                "leave --address/RAY_ADDRESS unset to run on an embedded local Ray instead."
            ) from e
    else:
        env = dict(runtime_env or {})
        env.setdefault("worker_process_setup_hook", QUIET_HOOK)
        kwargs["runtime_env"] = env
        # address="local": a new instance of our own, even where a `ray start` head runs on this
        # machine (plain ray.init() would join that one, and then refuse num_cpus)
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 dashboard_host="127.0.0.1", **kwargs)
    return ray


QUIET_HOOK = "loraga_ray.jobs.cluster.quiet_ray_internals"


def quiet_ray_internals() -> None:
    """Worker setup hook of the embedded instance. Two Ray Train lines would otherwise bury the
    progress lines every few seconds: an INFO line per reported result (the whole metrics dict),
    and the placement-group cleaner's warning that the state API is unavailable, which it always
    is on an embedded instance started without the dashboard. Their errors still show."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)  # that module names its logger by file


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of ``host:port`` or ``ray://host:port``; None for forms without one ("auto")."""
    rest = address.split("://", 1)[1] if "://" in address else address
    rest = rest.split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def check_reachable(address: str, timeout: float = REACH_TIMEOUT_S) -> None:
    """Fail fast, with a clear message, when nothing answers at the cluster address: ray.init
    itself can retry for minutes before giving up on a dead address."""
    target = _host_port(address)
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=timeout).close()
    except OSError as e:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address!r} ({target[0]}:{target[1]} did not answer within "
            f"{timeout:g}s: {e}). Check that the head node is up (`ray status` on it), that the port is the "
            "GCS port (default 6379) or ray://host:10001 for Ray Client, and that this machine can reach it; "
            "leave --address/RAY_ADDRESS unset to run on an embedded local Ray instead."
        ) from e


def cause_of(error: BaseException) -> BaseException:
    """The user-level exception inside Ray's wrappers: a task's or actor's error, Ray Data's,
    and Ray Train's (a worker group's first worker failure, or the controller's)."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        failures = getattr(error, "worker_failures", None)
        inner = (next(iter(failures.values()), None) if isinstance(failures, dict) and failures else None) \
            or getattr(error, "controller_failure", None) or getattr(error, "cause", None) or error.__cause__
        if inner is None or not isinstance(inner, BaseException):
            break
        error = inner
    return error


def reraise_clean(error: BaseException):
    """Raise the cause of a failed Ray task as itself when it is one of ours (a clear message)."""
    cause = cause_of(error)
    if isinstance(cause, (ValueError, TypeError, FileNotFoundError, ImportError)):
        raise cause from None
    raise error


def error_message(error: BaseException) -> str:
    """What the user reads for a failed command: our own message (also from inside a Ray task,
    actor or Train worker, whose wrappers carry the remote traceback), or for anything else its
    type and first line, with the way to the traceback. Never a traceback itself."""
    cause = cause_of(error)
    ours = (ValueError, TypeError, FileNotFoundError, RuntimeError)
    for e in (error, cause):  # the outer message when it is ours and clean (it may add advice), else the cause's
        text = str(e).strip()
        if isinstance(e, ours) and not _is_ray_wrapper(e) and "Traceback (most recent call last)" not in text:
            return text
    first = (str(cause).strip().splitlines() or [""])[0]
    return f"unexpected {type(cause).__name__}: {first} (run with -v for the traceback, and please report it)"


def _is_ray_wrapper(e: BaseException) -> bool:
    return type(e).__module__.startswith("ray.") or "RayTaskError" in type(e).__name__

