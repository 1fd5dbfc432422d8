"""Row failures are handled once for every worker: rejected with a reason, never sinking the shard;
the shard's report accounts for every row."""

from __future__ import annotations

import asyncio

from actors.shard_work import OccupancySampler, RowRejected, ShardResult, guarded_row, run_rows

ROW = {"index": 7, "id": "p7"}


async def _raise(exc: BaseException, row):
    raise exc


def run(process, expected=()):
    return asyncio.run(guarded_row(ROW, process, "judge", expected))


def test_a_row_that_works_gives_its_rows_and_no_reject():
    async def ok(row):
        return [{"index": row["index"], "text": "fine"}]

    assert run(ok) == ([{"index": 7, "text": "fine"}], None)


def test_expected_failures_reject_with_their_own_message_and_others_name_the_error():
    assert run(lambda row: _raise(RowRejected("no answers for this prompt id"), row)) == (
        [], {"index": 7, "id": "p7", "reason": "no answers for this prompt id", "stage": "judge"})
    assert run(lambda row: _raise(ValueError("too long"), row), expected=(ValueError,))[1]["reason"] == "too long"
    assert run(lambda row: _raise(KeyError("x"), row))[1]["reason"] == "judge error: KeyError: 'x'"


class NoMetrics:  # stands in for StageMetrics, whose Ray metrics need a Ray worker
    def shard_seconds(self, seconds: float) -> None:
        pass

    def running_requests(self, mean: float) -> None:
        pass


def test_a_shard_reports_every_row_as_output_or_reject():
    async def row_work(row):
        if row["id"] == "p1":
            raise RowRejected("no")
        return [{"index": row["index"], "generated_tokens": 3}]

    rows = [{"index": i, "id": f"p{i}"} for i in range(3)]
    result = asyncio.run(run_rows(4, rows, row_work, OccupancySampler(lambda: 2), NoMetrics(), stage="judge"))
    assert isinstance(result, ShardResult) and result.shard == 4
    assert [r["index"] for r in result.rows] == [0, 2]
    assert result.rejects == [{"index": 1, "id": "p1", "reason": "no", "stage": "judge"}]
    assert result.tokens == 6
    assert result.started_at <= result.finished_at and result.seconds >= 0
    assert result.occupancy_sum == 2 * result.occupancy_samples
