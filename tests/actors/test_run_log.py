"""The live metrics.jsonl of a training run: one row per step, in order, across restarts."""

import json

from actors.run_log import RunLog, read_rows


def test_each_step_once_and_the_newest_when_a_restart_repeats_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = RunLog(str(path), "ppo", "run-1")
    for step in (1, 2, 3, 4):
        log.append({"step": step, "reward": step / 10, "rollout_seconds": 1.0})
    # a learner restarted from checkpoint 2 repeats steps 3 and 4
    log.append({"step": 3, "reward": 0.33})
    assert [(r["step"], r["reward"]) for r in read_rows(path)] == [(1, 0.1), (2, 0.2), (3, 0.33)]
    log.append({"step": 4, "reward": 0.44})
    assert [r["step"] for r in read_rows(path)] == [1, 2, 3, 4]

    # a new RunLog (the driver rerun after a crash) continues the same file by the same rule
    again = RunLog(str(path), "ppo", "run-1")
    again.append({"step": 2, "reward": 0.22})
    assert [(r["step"], r["reward"]) for r in read_rows(path)] == [(1, 0.1), (2, 0.22)]


def test_a_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + '{"step": 2, "lo')
    assert read_rows(path) == [{"step": 1, "loss": 2.0}]
    log = RunLog(str(path), "sft", "run-2")
    log.append({"step": 2, "loss": 1.5})
    assert [r["step"] for r in read_rows(path)] == [1, 2]
