"""The ``shm`` weight-sync transport on a two-node cluster (``ray.cluster_utils.Cluster``):
this process is the learner, on the head node; one rollout engine shares its node (it reads
the shared region), the other is on a second node (its buckets come over gloo). Both must hold
the learner's weights exactly after every push.

``test_weight_sync_nodes.py`` runs this in a subprocess with a private ``RAY_TMPDIR``.

Usage: python weight_sync_nodes_scenario.py RESULT.json WORK_DIR MODEL_DIR  (a tiny model)
"""

from __future__ import annotations

import json
import sys

import ray
import torch
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from transformers import AutoModelForCausalLM

from actors.engine import EngineOptions
from actors.engine_config import EngineConfig
from actors.rollout_worker import RolloutWorker
from tests.learners.test_weight_sync import REFERENCE, engine_gap, perturb, weight_sync


def main(result_path: str, model: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    other = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    try:
        head = ray.get_runtime_context().get_node_id()
        engines = [ray.remote(num_cpus=1, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))(
            RolloutWorker).remote(EngineOptions(model=model, config=EngineConfig(max_model_len=512, enforce_eager=True)))
            for node in (head, other.node_id)]
        nodes = [ray.get(engine.sync_state.remote())["node"] for engine in engines]
        learner = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        sync = weight_sync(learner, engines, sync_transport="shm")
        rows, gaps = [], []
        for version in (1, 2):
            perturb(learner)
            rows.append(sync.sync(version, REFERENCE))
            gaps.append([engine_gap(engine, learner) for engine in engines])
        sync.close()
        result = {"learner_node": head, "engine_nodes": nodes, "rows": rows, "gaps": gaps,
                  "versions": [ray.get(e.sync_state.remote())["version"] for e in engines]}
        for engine in engines:
            ray.kill(engine, no_restart=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    with open(result_path, "w") as out:
        json.dump(result, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[3])
