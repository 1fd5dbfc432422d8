"""An elastic `cai generate --workers 0 --max-workers 3` on an autoscaling cluster; writes JSON.

``test_elastic.py`` runs this in a subprocess (``cluster_scenario.py``). The cluster is a real
``ray start --head`` with Ray's fake multi-node autoscaler provider
(``ray.autoscaler._private.fake_multi_node``, the provider of Ray's own autoscaler tests): the
autoscaler launches each worker node as a raylet on this machine. The head has no CPUs and
there is no worker node at the start:

1. the pool asks the autoscaler for room for 3 workers (``request_resources``) and waits for its
   first placement; the autoscaler launches 1-CPU nodes, and the pool grows onto each as it
   joins (the drill ``--hold-until-workers 3`` holds the shards after the first until all 3 are
   up, whatever the engines' speed);
2. once every shard is handed out the pool withdraws the request; with the run over, nothing
   holds the nodes, and the autoscaler removes them after its idle timeout.

Ray's ``AutoscalingCluster`` (``ray.cluster_utils``) does the same but first stops every Ray on
the machine (its ``start``), and reads an ``example.yaml`` that the Ray 2.60 wheel does
not ship; so the head is started here with free ports and a temp dir of its own
(``ray_head.py``), and stopped by its process group.

Usage: python autoscaler_scenario.py RESULT.json WORK_DIR MODEL_DIR
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

# The head runs without token auth (below); this driver must too. Ray reads the mode when it is
# imported, and a pytest process that started its own local Ray passes RAY_AUTH_MODE=token down
# (Ray sets it there): in token mode the driver refuses the head's calls, and every actor it
# started died "cancelled before it started running" (the suite's failures of 2026-12-05).
os.environ["RAY_AUTH_MODE"] = "disabled"

import ray  # noqa: E402 - after the auth mode is set

from tests.workflows.runtime.ray_head import BIN, clean_env, free_ports, node_port_flags, short_temp_dir, start_head, stop_head, wait_for_head
from tests.workflows.runtime.cluster_scenario import generate_config
from workflows.generate import run_generate
from workflows.runtime.ray_session import connect_ray

PROMPTS = 16  # 8 shards of 2
WORKERS = 3
IDLE_TIMEOUT_S = 3


def autoscaling_config(gcs_address: str) -> dict:
    """The fake provider's cluster: a 0-CPU head and up to 3 nodes of 1 CPU."""
    return {
        "cluster_name": "cai-fake", "max_workers": WORKERS, "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_S / 60,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "ray.worker.cpu": {"resources": {"CPU": 1, "object_store_memory": 80 * 1024 * 1024}, "node_config": {},
                               "min_workers": 0, "max_workers": WORKERS},
        },
        "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def alive_worker_nodes() -> int:
    return sum(1 for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) > 0)


def requested_bundles() -> list:
    """What the autoscaler is asked for now: the request the v1 autoscaler reads from the GCS
    (Ray 2.60 private key, ray.autoscaler._private.constants.AUTOSCALER_RESOURCE_REQUEST_CHANNEL)."""
    from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    value = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(value) if value else []


def main(result_path: str, work: str, model: str) -> None:
    work_dir = Path(work)
    out = work_dir / "run"
    temp_dir = short_temp_dir("cai-as-")
    gcs, dashboard = free_ports(2)
    address = f"{ray.util.get_node_ip_address()}:{gcs}"
    config_file = temp_dir / "autoscaling.json"
    config_file.write_text(json.dumps(autoscaling_config(address)))
    env = clean_env(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="disabled")
    command = [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dashboard}",
               "--include-dashboard=false", "--num-cpus=0", f"--temp-dir={temp_dir}",
               f"--autoscaling-config={config_file}", *node_port_flags()]
    log_path = temp_dir / "head.log"
    head = start_head(command, env, log_path)
    result: dict = {}
    try:
        def up() -> bool:  # the GCS port answers
            try:
                socket.create_connection((address.rsplit(":", 1)[0], gcs), timeout=1).close()
                return True
            except OSError:
                return False

        wait_for_head(head, log_path, up)
        connect_ray(address=address)
        config = generate_config(model, work_dir, PROMPTS, workers=0, max_workers=WORKERS, max_new_tokens=16,
                                 placement_timeout=300, hold_until_workers=WORKERS)
        summary = run_generate(config)
        result["request_after_run"] = requested_bundles()
        result["nodes_after_run"] = alive_worker_nodes()
        deadline = time.monotonic() + IDLE_TIMEOUT_S + 60
        while alive_worker_nodes() and time.monotonic() < deadline:
            time.sleep(1)
        result["nodes_after_idle_timeout"] = alive_worker_nodes()
        import pyarrow.parquet as pq

        rows = [r for p in sorted((out / "data").glob("*.parquet")) for r in pq.read_table(p, columns=["index"]).to_pylist()]
        result.update(
            summary={k: summary.get(k) for k in ("rows_out", "rejected", "workers_peak", "workers_timeline",
                                                  "autoscaler_request")},
            indexes=sorted(r["index"] for r in rows), prompts=PROMPTS, workers=WORKERS,
        )
    finally:
        Path(result_path).write_text(json.dumps(result, indent=1))
        ray.shutdown()
        stop_head(head)


if __name__ == "__main__":
    main(*sys.argv[1:4])
