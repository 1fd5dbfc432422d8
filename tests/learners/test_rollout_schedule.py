"""The rollout schedule's rules (learners/rollout_schedule.py) on fake engines: how old each
trained batch's policy is, when the engines take weights (never under a request), which label
a catch-up push carries, and what a restarted learner samples. The real engines run the same
schedule in tests/workflows/test_ppo.py."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest

from learners.ppo_config import PPOConfig
from learners.rollout_schedule import RolloutSchedule, step_prompts

STEPS = 8


@dataclass(frozen=True)
class FakeRollout:
    token_ids: tuple[int, ...]
    finish_reason: str
    logprobs: tuple[float, ...]
    version: int


class FakeEngines:
    """Engines that answer a request only with the version they hold, as RolloutWorker does."""

    def __init__(self, count: int):
        self.versions = [0] * count
        self.actors = list(range(count))
        self.live_in_step = count
        self.in_flight = 0
        self.events: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def generate(self, prompts, version, sampling, seeds, results=None, crash=None):
        results = [None] * len(prompts) if results is None else results
        with self.lock:
            self.in_flight += 1
            self.events.append(("generate", version))
        time.sleep(0.02)  # answers take a while: a push in that window would change weights under them
        holders = [i for i, held in enumerate(self.versions) if held == version]
        for i, seed in enumerate(seeds):
            if results[i] is None and holders:
                results[i] = FakeRollout((seed,), "stop", (-0.5,), version)
        with self.lock:
            self.in_flight -= 1
        return results


class FakeSync:
    def __init__(self, engines: FakeEngines):
        self.engines = engines

    def sync(self, version, reference, *, only_if_stale=False):
        assert self.engines.in_flight == 0, "weights pushed while a request was in flight"
        self.engines.events.append(("push", version))
        self.engines.versions = [version if not only_if_stale or held != version else held
                                 for held in self.engines.versions]
        return {"sync_engines": len(self.engines.versions)}


def schedule_for(max_staleness: int, engines: FakeEngines, engine_version: int = 0) -> RolloutSchedule:
    cfg = PPOConfig(policy="policy", prompts="prompts.jsonl", out="out", reward_fn="brevity", steps=STEPS,
                    rollout_batch=4, minibatch=2, max_staleness=max_staleness)
    prompts = [[i, i + 1] for i in range(10)]
    return RolloutSchedule(cfg, engines, FakeSync(engines), prompts, rank=0, world=1, device="cpu",
                           engine_version=engine_version)


def run(schedule: RolloutSchedule, first: int = 0) -> list[dict]:
    """The PPO loop's use of the schedule, training replaced by a short sleep: the learner holds
    version ``step`` when step ``step`` begins, and ``step + 1`` after it trained."""
    rows, ahead = [], None
    for step in range(first, STEPS):
        batch, ahead, pushed = schedule.begin_step(step, ahead, reference=([1], [2]))
        time.sleep(0.01)  # training
        pushed = {**pushed, **schedule.end_step(step, reference=([1], [2]))}
        rows.append({"step": step, "batch_step": batch.step, "versions": {r.version for r in batch.results},
                     "seeds": [r.token_ids[0] for r in batch.results], "pushed": pushed.get("sync_version")})
    schedule.close()
    return rows


@pytest.mark.parametrize("max_staleness", [0, 1, 2, 3])
def test_every_trained_batch_is_at_most_max_staleness_versions_old(max_staleness):
    engines = FakeEngines(2)
    rows = run(schedule_for(max_staleness, engines))
    assert [row["batch_step"] for row in rows] == list(range(STEPS)), "each step trains its own batch, once"
    staleness = [row["step"] - min(row["versions"]) for row in rows]
    assert max(staleness) == min(max_staleness, STEPS - 1)
    assert all(0 <= s <= max_staleness for s in staleness), staleness
    if max_staleness == 1:
        assert staleness == [0] + [1] * (STEPS - 1)
    pushes = [version for kind, version in engines.events if kind == "push"]
    if max_staleness == 0:  # synchronous: the new policy after every step
        assert pushes == list(range(1, STEPS + 1))
    else:  # overlapped: only when the next batch would be too old, so every N steps
        assert pushes == list(range(max_staleness, STEPS - 1, max_staleness)), pushes


def test_overlapped_requests_leave_before_the_learner_trains():
    engines = FakeEngines(1)
    run(schedule_for(1, engines))
    kinds = [kind for kind, _ in engines.events]
    # after the first step, each step's request goes out with the engines' version, and a push
    # comes only between one batch's answers and the next request
    assert kinds[:2] == ["generate", "generate"] and kinds[2:4] == ["push", "generate"]


def test_the_catch_up_pushes_the_learners_own_version_never_an_older_label():
    """The engines restarted (back at version 0) under the batch the learner submitted ahead
    with version 2; the learner holds version 3 when it collects: it pushes 3, labelled 3, and
    samples what is missing with it."""
    engines = FakeEngines(2)
    schedule = schedule_for(1, engines, engine_version=2)
    engines.versions = [0, 0]
    ahead = schedule.submit(3, 2)
    batch = schedule.collect(ahead, 3, reference=([1], [2]))
    schedule.close()
    assert ("push", 2) not in engines.events and ("push", 3) in engines.events
    assert {r.version for r in batch.results} == {3} and schedule.engine_version == 3
    assert batch.catch_up["catchup_sync_seconds"] >= 0


def test_a_restarted_learner_samples_the_batch_that_was_in_flight_again():
    """Learners restored from the checkpoint of step 4 have nothing in flight: they sample step
    4's prompts with step 4's seeds (the engines still hold version 3 from before the crash)."""
    engines = FakeEngines(2)
    before = run(schedule_for(1, engines))
    engines = FakeEngines(2)
    engines.versions = [3, 3]
    after = run(schedule_for(1, engines, engine_version=4), first=4)
    assert [row["batch_step"] for row in after] == [4, 5, 6, 7]
    assert [row["seeds"] for row in after] == [row["seeds"] for row in before[4:]], "the same answers are asked for"
    assert after[0]["versions"] == {4} and ("push", 4) in engines.events


def test_step_prompts_split_each_step_over_the_ranks():
    both = step_prompts(10, 3, 4, 0, 2, seed=0) + step_prompts(10, 3, 4, 1, 2, seed=0)
    assert both == step_prompts(10, 3, 4, 0, 1, seed=0) and len(set(both)) == 4
