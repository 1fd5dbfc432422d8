"""The elastic pool on a real multi-raylet cluster (``elastic_scenario.py``, in a subprocess):
`cai generate --workers 0` starts on one worker node and grows onto two that join mid-run."""

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

