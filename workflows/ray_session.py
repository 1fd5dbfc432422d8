"""One way into Ray for every command: join ``RAY_ADDRESS`` or start a local instance.

Local instances bind the dashboard to 127.0.0.1 (never to the world) and keep Ray's default
token authentication. Actors live in the ``cai`` namespace so ``ray list actors`` and the
dashboard show them under their ``cai-<stage>-<run>-<i>`` names.
"""

from __future__ import annotations

import os
from typing import Any

NAMESPACE = "cai"
DASHBOARD_ENV = "RAY_CAI_DASHBOARD"
_dashboard_url: str | None = None


def connect_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    include_dashboard: bool | None = None,
    runtime_env: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Connect (or start) Ray once per process and describe the cluster.

    ``address`` (or ``RAY_ADDRESS``) joins an existing cluster; without either, a local
    instance is sized to this machine (or to ``num_cpus``/``num_gpus``). The dashboard of a
    local instance is on unless ``include_dashboard=False`` or ``RAY_CAI_DASHBOARD=0``.
    """
    import ray

    global _dashboard_url
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        common = {"namespace": NAMESPACE, "runtime_env": runtime_env, "log_to_driver": True}
        if address:
            info = ray.init(address=address, **common)
        else:
            if include_dashboard is None:
                include_dashboard = os.environ.get(DASHBOARD_ENV, "1") != "0"
            info = ray.init(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                include_dashboard=include_dashboard,
                dashboard_host="127.0.0.1",
                **common,
            )
        _dashboard_url = info.dashboard_url or None
    return describe_cluster()


def describe_cluster() -> dict[str, Any]:
    import ray

    context = ray.get_runtime_context()
    resources = ray.cluster_resources()
    return {
        "address": context.gcs_address,
        "namespace": context.namespace,
        "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
        "cpus": resources.get("CPU", 0),
        "gpus": resources.get("GPU", 0),
        "dashboard_url": _dashboard_url,
    }
