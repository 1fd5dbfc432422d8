"""The stage runner on a real local Ray instance with a plain worker (no engine): staging,
every row in the output or in rejects with its reason, the manifest, resume and identity."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pytest

from actors.metrics import StageMetrics
from actors.shard_work import OccupancySampler, RowRejected, ShardResult, run_rows
from core.run_identity import RunMismatchError
from workflows.runtime.stage_runner import PoolConfig, StageJob, run_stage

SCHEMA = pa.schema([("index", pa.int64()), ("id", pa.string()), ("shout", pa.string())])


class Shouter:
    """Upper-cases each prompt; rejects prompts that mention 'skip', fails on 'boom'."""

    def __init__(self, *, run_name: str = ""):
        self.metrics = StageMetrics("shout", run_name)
        self.sampler = OccupancySampler(lambda: 0)

    def ready(self) -> bool:
        return True

    def shutdown(self) -> None:
        """What the pool asks before it kills a worker; no engine here to stop."""

    async def run_shard(self, shard: int, rows: list[dict[str, Any]]) -> ShardResult:
        return await run_rows(shard, rows, self._row, self.sampler, self.metrics, stage="shout",
                              expected=(KeyError,))

    async def _row(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        text = row["messages"][-1]["content"]
        if "skip" in text:
            raise RowRejected("asked to be skipped")
        if "boom" in text:
            raise RuntimeError("it blew up")
        return [{"index": row["index"], "id": row["id"], "shout": text.upper()}]


def job(tmp_path, prompts, **identity) -> StageJob:
    return StageJob(stage="shout", out=tmp_path / "run", prompts=str(prompts),
                    pool=PoolConfig(shard_size=3, workers=2, cpus_per_worker=0.5), identity={"case": "upper", **identity},
                    config={}, output_schema=SCHEMA, worker_cls=Shouter)


@pytest.fixture()
def prompts(tmp_path):
    texts = [f"hello {i}" for i in range(8)] + ["please skip me", "boom", ""]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(texts)))
    return path


def rejects(out) -> dict[int, str]:
    return {r["index"]: r["reason"] for f in sorted((out / "rejects").glob("*.jsonl"))
            for r in map(json.loads, f.read_text().splitlines())}


def test_every_row_ends_in_the_output_or_in_rejects_with_its_reason(ray_local, prompts, tmp_path):
    summary = run_stage(job(tmp_path, prompts))
    assert (summary["rows_in"], summary["rows_out"], summary["rejected"]) == (11, 8, 3)
    assert summary["already_done"] is False
    reasons = rejects(tmp_path / "run")
    assert reasons[8] == "asked to be skipped"
    assert reasons[9] == "shout error: RuntimeError: it blew up"
    assert 10 in reasons  # the empty prompt, refused while staging
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["identity"] == {"case": "upper"} and all(s["status"] == "done" for s in manifest["shards"].values())


def test_a_rerun_does_nothing_and_another_identity_is_refused(ray_local, prompts, tmp_path):
    first = run_stage(job(tmp_path, prompts))
    again = run_stage(job(tmp_path, prompts))
    assert again["already_done"] is True and again["rows_out"] == first["rows_out"]
    with pytest.raises(RunMismatchError, match="case"):
        run_stage(job(tmp_path, prompts, case="lower"))
