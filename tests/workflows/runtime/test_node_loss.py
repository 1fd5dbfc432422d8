"""`cai generate` on a real multi-raylet cluster that grows, loses a node, then loses all of
them (``node_loss_scenario.py``, in a subprocess: one process joins one cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.workflows.runtime.cluster_scenario import run_scenario

SCENARIO = Path(__file__).with_name("node_loss_scenario.py")

pytestmark = [pytest.mark.slow, pytest.mark.fault]


@pytest.fixture(scope="module")
def scenario(tiny_model) -> dict:
    result, done = run_scenario(SCENARIO, tiny_model, timeout=1200)
    print("node-loss phases (s):", result.get("phase_seconds"), "shards done when the bundle moved:",
          result.get("shards_when_bundle_moved"), "before total loss:",
          result.get("shards_before_total_loss"), "of", result.get("prompts", 0) // 2)
    return {**result, "log": done.stderr}


def test_placement_waits_for_nodes_and_says_what_it_waits_for(scenario):
    assert scenario["waited_without_nodes"], "the run must wait while no node fits, not fail"
    assert "waiting" in scenario["log"] and "pending" in scenario["log"], "progress lines name what is pending"


def test_a_lost_node_moves_its_worker_and_the_run_goes_on(scenario):
    assert scenario["bundle_moved_to_spare"]
    assert scenario["still_running_before_total_loss"]
    # a worker lost with a shard in flight (the drill's: a removed node's worker may be between
    # shards when it goes) had it redone; every row once is test_the_rerun_finishes_...
    assert scenario["retried_shards"] >= 1, "the lost worker's in-flight shard was redone"


def test_losing_every_node_stops_the_run_within_the_timeout(scenario):
    assert scenario["stopped"]
    assert scenario["error"].startswith("NoCapacityError: no worker could be placed"), scenario["error"]
    assert "rerun the same command" in scenario["error"]
    # the timeout counts from when no worker is up; Ray needs a few seconds to notice dead nodes
    assert scenario["seconds_to_error"] < scenario["placement_timeout"] + 90
    assert scenario["shards_kept"] >= scenario["shards_before_total_loss"]


def test_the_rerun_finishes_with_every_row_exactly_once(scenario):
    assert len(scenario["staged_copies"]) == 1, "--stage-model copied the model to the new node, once"
    assert scenario["rerun"]["rows_out"] == scenario["prompts"] and scenario["rerun"]["rejected"] == 0
    assert scenario["indexes"] == list(range(scenario["prompts"]))
