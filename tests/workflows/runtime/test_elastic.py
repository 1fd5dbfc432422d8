"""The elastic pool on a real multi-raylet cluster (``elastic_scenario.py``, in a subprocess):
`cai generate --workers 0` starts on one worker node and grows onto two that join mid-run; and
on an autoscaling cluster (``autoscaler_scenario.py``, Ray's fake multi-node provider) it asks
for room, grows onto the nodes the autoscaler adds, and withdraws the request."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.workflows.runtime.cluster_scenario import run_scenario

pytestmark = [pytest.mark.slow, pytest.mark.fault]


@pytest.fixture(scope="module")
def scenario(tiny_model) -> dict:
    return run_scenario(Path(__file__).with_name("elastic_scenario.py"), tiny_model, timeout=900)[0]


def test_the_pool_grows_onto_nodes_that_join_and_every_row_comes_out_once(scenario):
    summary = scenario["summary"]
    timeline = summary["workers_timeline"]
    assert [up for _, up in timeline[:2]] == [0, 1], f"it started with the one worker that fit: {timeline}"
    assert summary["workers_peak"] >= 3, timeline
    assert [t for t, _ in timeline] == sorted(t for t, _ in timeline)
    assert len(scenario["shard_workers"]) >= 3, "shards ran on the workers the pool added"
    assert summary["rows_out"] == scenario["prompts"] and summary["rejected"] == 0
    assert scenario["indexes"] == list(range(scenario["prompts"])), "every row exactly once"
    assert scenario["manifest_summary"] == {k: summary[k] for k in ("workers_peak", "workers_timeline")}


@pytest.fixture(scope="module")
def autoscaled(tiny_model) -> dict:
    return run_scenario(Path(__file__).with_name("autoscaler_scenario.py"), tiny_model, timeout=900)[0]


def test_an_autoscaling_cluster_is_asked_for_room_and_the_request_is_withdrawn(autoscaled):
    summary = autoscaled["summary"]
    request = summary["autoscaler_request"]
    assert request["workers"] == autoscaled["workers"] and request["at"] is not None
    assert request["withdrawn_at"] is not None and request["withdrawn_at"] >= request["at"]
    # without the request the autoscaler adds only the node the pool's first placement waits
    # for, and the pool, which grows only onto nodes that exist, would stay at one worker
    assert summary["workers_peak"] == autoscaled["workers"], summary["workers_timeline"]
    assert autoscaled["request_after_run"] == [], "the request was withdrawn"
    assert autoscaled["nodes_after_idle_timeout"] == 0, "nothing held the nodes once the run was over"
    assert summary["rows_out"] == autoscaled["prompts"] and summary["rejected"] == 0
    assert autoscaled["indexes"] == list(range(autoscaled["prompts"]))
