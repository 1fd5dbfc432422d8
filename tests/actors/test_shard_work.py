"""Row failures are handled once for every worker: rejected with a reason, never sinking the shard."""

from __future__ import annotations

import asyncio

from actors.shard_work import RowRejected, guarded_row

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
