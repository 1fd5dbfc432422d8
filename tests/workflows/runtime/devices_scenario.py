"""GPU-aware defaults and GPU memory on a multi-node cluster with logical GPUs; writes JSON.

``test_devices.py`` runs this in a subprocess (``cluster_scenario.py``). The cluster:

- a head with no CPUs and no GPUs;
- ``gpu``: 2 CPUs and 2 logical GPUs, labelled ``ray-cai/gpu-memory-gib=24`` as an operator
  labels a node of 24 GiB GPUs;
- ``cpu``: 1 CPU, no GPU.

1. ``cai plan --config configs/cluster.yaml`` with ``--gpu-memory-gib`` left to ``auto`` reads
   the 24 GiB from the GPU node and refuses the config, naming the stages that cannot fit.
2. ``cai generate --workers 0`` with the GPU options unset reserves one GPU per engine (the
   tensor-parallel size): its engines go to the GPU node only (2 of them; the drill
   ``--hold-until-workers 2`` holds the shards after the first until both are up), none to the
   CPU-only node, where the old default (no GPU) would have put a third.
3. A GPU node joins without the label: ``auto`` reads its memory with a task on that node
   (no NVML here), and the plan then fails naming the node it could not read.

Usage: python devices_scenario.py RESULT.json WORK_DIR MODEL_DIR
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

from ray.cluster_utils import Cluster

from tests.workflows.runtime.cluster_scenario import REPO, finish_scenario, generate_config
from workflows.cli.main import main as cai
from workflows.generate import run_generate
from learners.ppo_config import PPOConfig
from workflows.runtime.devices import GPU_MEMORY_LABEL, joined_on_devices
from workflows.runtime.ray_session import connect_ray

SMALL_STORE = 80 * 1024 * 1024
PROMPTS = 8  # 4 shards of 2


def cai_plan() -> dict:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cai(["plan", "--config", str(REPO / "configs" / "cluster.yaml")])
    return {"rc": rc, "out": out.getvalue(), "err": err.getvalue()}


def main(result_path: str, work: str, model: str) -> None:
    work_dir = Path(work)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "object_store_memory": SMALL_STORE})
    gpu = cluster.add_node(num_cpus=2, num_gpus=2, labels={GPU_MEMORY_LABEL: "24"}, object_store_memory=SMALL_STORE)
    cpu = cluster.add_node(num_cpus=1, object_store_memory=SMALL_STORE)
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address  # as `cai` run against this cluster would have it
    connect_ray()
    result: dict = {"gpu_node": gpu.node_id, "cpu_node": cpu.node_id, "gpu_address": gpu.node_ip_address}
    try:
        result["plan"] = cai_plan()
        config = generate_config(model, work_dir, PROMPTS, workers=0, max_new_tokens=8, placement_timeout=120,
                                 hold_until_workers=2)  # both engines up before the shards run out
        summary = run_generate(config)
        result["generate"] = {k: summary[k] for k in ("rows_in", "rows_out", "rejected", "workers_peak",
                                                      "gpus_per_worker")}
        result["unset_gpus_per_worker"] = config.pool.gpus_per_worker
        ppo = PPOConfig(policy=model, reward_fn="brevity", prompts="p.jsonl", out="o")
        result["ppo_use_gpu"] = {"unset": ppo.learner.use_gpu, "on_cluster": joined_on_devices(ppo).learner.use_gpu}
        cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=SMALL_STORE)
        cluster.wait_for_nodes()
        result["plan_unread"] = cai_plan()
    finally:
        finish_scenario(result_path, result, cluster)


if __name__ == "__main__":
    main(*sys.argv[1:4])
