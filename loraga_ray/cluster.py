"""Connecting to Ray: an embedded local instance by default, a cluster when an address is given."""

from __future__ import annotations

import os


class ClusterError(RuntimeError):
    """Ray could not be reached or cannot give what the job asks for."""


def connect(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
            quiet: bool = False, runtime_env: dict | None = None):
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start an embedded local Ray whose
    dashboard listens on 127.0.0.1 only. Returns the ``ray`` module, initialised."""
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(log_to_driver=not quiet, runtime_env=runtime_env)
    if address:
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
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, dashboard_host="127.0.0.1", **kwargs)
    return ray
