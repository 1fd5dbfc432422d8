"""Placement of engine workers: pure counting on hand-written nodes, and real Ray placement
on a fake cluster (head: 1 CPU; two workers with 2 CPUs + 2 logical GPUs each; one with
2 CPUs + 4 logical GPUs), checked against the engine arguments each worker would start with.

The Ray part runs ``placement_scenario.py`` in a subprocess: this pytest process may already
hold the session's ``ray_local`` instance, and one process can join only one cluster.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.workflows.runtime.cluster_scenario import run_scenario

from workflows.runtime.placement import PlacementError, WorkerResources, workers_that_fit

pytestmark = pytest.mark.fault  # kills, restarts or races: `make flake-hunt`

SCENARIO = Path(__file__).with_name("placement_scenario.py")

# --- pure: bundles and counting, no Ray ---------------------------------------------------


def test_bundle_omits_gpu_key_for_cpu_workers():
    assert WorkerResources().bundle() == {"CPU": 1.0}
    assert WorkerResources(cpus=2, gpus=4).bundle() == {"CPU": 2.0, "GPU": 4.0}


@pytest.mark.parametrize(
    "cpus, gpus, field",
    [(0, 0, "cpus > 0 or gpus > 0"), (-1, 1, "must be >= 0"), (1, 1.5, "whole number")],
)
def test_invalid_worker_resources_name_the_problem(cpus, gpus, field):
    with pytest.raises(ValueError, match=field):
        WorkerResources(cpus=cpus, gpus=gpus)


TWO_GPU_NODES = [{"CPU": 1}, {"CPU": 2, "GPU": 2}, {"CPU": 2, "GPU": 2}]


@pytest.mark.parametrize(
    "resources, expected",
    [
        (WorkerResources(cpus=1, gpus=2), 2),  # one TP=2 engine per GPU node
        (WorkerResources(cpus=1, gpus=1), 4),
        (WorkerResources(cpus=2, gpus=1), 2),  # CPUs limit: one worker per GPU node
        (WorkerResources(cpus=1), 5),  # CPU-only workers use every node, head included
        (WorkerResources(cpus=1, gpus=4), 0),  # TP=4 needs 4 GPUs on ONE node: none has them
        (WorkerResources(cpus=0, gpus=0.5), 8),  # fractional GPUs, no CPU limit
    ],
)
def test_workers_that_fit_packs_each_node_separately(resources, expected):
    assert workers_that_fit(resources, TWO_GPU_NODES) == expected


def test_workers_that_fit_reads_ray_node_records_and_skips_dead_nodes():
    nodes = [
        {"Alive": True, "Resources": {"CPU": 8, "GPU": 8, "memory": 1e9}},
        {"Alive": False, "Resources": {"CPU": 8, "GPU": 8}},
    ]
    assert workers_that_fit(WorkerResources(cpus=2, gpus=2), nodes) == 4


def test_workers_that_fit_tolerates_float_noise():
    assert workers_that_fit(WorkerResources(cpus=0.2), [{"CPU": 0.6}]) == 3


def test_nothing_fits_on_no_nodes():
    assert workers_that_fit(WorkerResources(), []) == 0


# --- real Ray on a fake GPU cluster, in a subprocess ---------------------------------------


@pytest.fixture(scope="module")
def scenario() -> dict:
    return run_scenario(SCENARIO, timeout=180)[0]


@pytest.mark.slow
def test_the_fake_cluster_has_two_2_gpu_nodes_and_one_4_gpu_node(scenario):
    assert scenario["node_gpus"] == [0, 2, 2, 4]


@pytest.mark.slow
def test_a_tensor_parallel_4_worker_gets_4_gpus_on_one_node(scenario):
    (worker,) = scenario["tp4"]
    assert len(worker["gpu_ids"]) == 4 and len(set(worker["gpu_ids"])) == 4
    # vLLM's "mp" TP workers inherit the actor's CUDA_VISIBLE_DEVICES: it must name those GPUs.
    assert worker["cuda_visible_devices"].split(",") == worker["gpu_ids"]


@pytest.mark.parametrize("pool, tp", [("tp4", 4), ("tp2", 2), ("tp1_spread", 1)])
@pytest.mark.slow
def test_engine_tensor_parallel_equals_the_gpus_of_its_bundle(scenario, pool, tp):
    for worker in scenario[pool]:
        assert worker["bundle_gpus"] == worker["actor_num_gpus"] == tp
        assert len(worker["gpu_ids"]) == worker["engine_tp"] == tp
        # inside a placement group vLLM would default to its Ray executor, which refuses a
        # bundle of more than one GPU: the engine arguments must name "mp" for TP > 1
        assert worker["in_placement_group"]
        assert worker["engine_executor"] == ("mp" if tp > 1 else None)


@pytest.mark.slow
def test_tensor_parallel_workers_get_two_gpus_each_on_different_nodes(scenario):
    workers = scenario["tp2"]
    assert len(workers) == 2
    assert workers[0]["node_id"] != workers[1]["node_id"]
    for worker in workers:
        assert len(worker["gpu_ids"]) == 2
        # vLLM's TP workers inherit the actor's CUDA_VISIBLE_DEVICES: it must name those GPUs.
        assert worker["cuda_visible_devices"].split(",") == worker["gpu_ids"]


@pytest.mark.slow
def test_spread_puts_single_gpu_workers_on_different_nodes(scenario):
    workers = scenario["tp1_spread"]
    assert len({w["node_id"] for w in workers}) == 2
    assert all(len(w["gpu_ids"]) == 1 for w in workers)


@pytest.mark.slow
def test_workers_that_fit_reads_the_live_cluster(scenario):
    # per node (head 1 CPU; 2 CPU + 2 GPU; 2 CPU + 2 GPU; 2 CPU + 4 GPU): TP 2 fits 1 + 1 + 2,
    # 1 GPU 2 + 2 + 2 (the 4-GPU node is CPU-bound), CPU-only 1 + 2 + 2 + 2, TP 4 only on the last
    assert scenario["fit"] == {"gpu2": 4, "gpu1": 6, "cpu1": 7, "cpu2_gpu1": 3, "gpu4": 1}


@pytest.mark.slow
def test_too_many_workers_fail_quickly_with_a_clear_message(scenario):
    too_big = scenario["too_big"]
    assert too_big["raised"], f"expected {PlacementError.__name__}"
    assert too_big["seconds"] < 15
    message = too_big["message"]
    assert "5 workers" in message and "'GPU': 2.0" in message
    assert "Only 4 of 5" in message
    assert message.count("CPU 2, GPU 2") == 2 and message.count("CPU 2, GPU 4") == 1, "lists each node's resources"


@pytest.mark.slow
def test_every_placement_group_is_removed(scenario):
    states = dict(scenario["pg_states"])
    assert set(states) == {"probe-4", "probe-2", "probe-1", "released-twice", "too-big"}
    assert set(states.values()) == {"REMOVED"}
