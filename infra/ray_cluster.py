"""Joining a Ray cluster: the one place that calls ``ray.init`` for the pipeline and the training launchers."""

from __future__ import annotations

import os
from collections.abc import Callable


def ensure_ray(address: str | None, log_to_driver: bool = True, before_init: Callable[[], None] | None = None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), or start a local one; nothing if Ray is up.

    Args:
        address: a Ray address, or None for ``RAY_ADDRESS`` / a new local cluster.
        log_to_driver: whether the workers' output reaches this process's console.
        before_init: called after ``ray.data`` is imported and before ``ray.init`` (the pipeline CLI
            reroutes Ray's loggers there).
    """
    import ray

    if ray.is_initialized():
        return
    import ray.data  # configures its loggers on import, so a caller's rerouting must come after

    if before_init is not None:
        before_init()
    if address is None and not os.environ.get("RAY_ADDRESS"):
        # A throwaway local cluster: Ray 2.60 would otherwise switch on token auth for it.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(include_dashboard=False, log_to_driver=log_to_driver)
    else:
        ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=log_to_driver)
