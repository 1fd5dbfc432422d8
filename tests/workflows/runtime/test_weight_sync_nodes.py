"""The ``shm`` transport across nodes (#16): an engine on the learner's node reads the shared
region, an engine on another node gets the same buckets over gloo, in one push, and both hold
the learner's weights exactly. Runs ``weight_sync_nodes_scenario.py`` in its own process
(one process joins one cluster; this one may hold the session's ``ray_local``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.workflows.runtime.cluster_scenario import run_scenario

pytestmark = pytest.mark.slow
SCENARIO = Path(__file__).with_name("weight_sync_nodes_scenario.py")


def test_the_engine_beside_the_learner_shares_memory_and_the_other_gets_gloo(tiny_model):
    result, _ = run_scenario(SCENARIO, tiny_model, timeout=600)
    assert result["engine_nodes"][0] == result["learner_node"] != result["engine_nodes"][1]
    for row in result["rows"]:
        assert row["sync_transport"] == "shm" and row["sync_engines"] == 2, row
        assert row["sync_shared_engines"] == 1, "only the engine on the learner's node reads the shared region"
    assert result["rows"][0]["sync_logprob_diff"] <= 1e-5, "the first push is checked, on both engines"
    assert all(gap <= 1e-5 for gaps in result["gaps"] for gap in gaps), result["gaps"]
    assert result["versions"] == [2, 2]
