"""``stop_engine_actors``: every actor is killed, after at most one grace period in all, whatever
its shutdown does (answers, fails, finds the actor dead, hangs). The first test stands in for
Ray with fakes (milliseconds); the second runs plain actors on the local Ray instance. The
engine's own processes: tests/actors/test_engine_stop.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import ray
from ray.exceptions import RayActorError

from workflows.runtime.engine_stop import stop_engine_actors


class FakeRef:
    def __init__(self, outcome):
        self.outcome = outcome  # "ok", "hang", or the exception ray.get raises


class FakeActor:
    def __init__(self, name: str, outcome):
        self.name, self.outcome = name, outcome

    @property
    def shutdown(self):
        if self.outcome == "no method":
            raise AttributeError("'ActorHandle' object has no attribute 'shutdown'")
        return self

    def remote(self):
        return FakeRef(self.outcome)


def test_every_actor_is_killed_whatever_its_shutdown_did(monkeypatch):
    waits, killed = [], []

    def wait(refs, *, num_returns, timeout):
        waits.append((len(refs), num_returns, timeout))
        return [r for r in refs if r.outcome != "hang"], [r for r in refs if r.outcome == "hang"]

    def get(ref):
        assert ref.outcome != "hang", "a hung shutdown is never waited on past ray.wait"
        if isinstance(ref.outcome, BaseException):
            raise ref.outcome

    monkeypatch.setattr(ray, "wait", wait)
    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray, "kill", lambda actor, *, no_restart: killed.append((actor.name, no_restart)))
    outcomes = {"answered": "ok", "dead": RayActorError(), "failed": RuntimeError("engine already gone"),
                "hung": "hang", "no method": "no method"}
    stop_engine_actors((FakeActor(name, outcome) for name, outcome in outcomes.items()), grace_s=3.0)
    assert waits == [(4, 4, 3.0)], "one wait, for every shutdown asked, bounded by the grace"
    assert killed == [(name, True) for name in outcomes]


def test_no_actor_no_wait(monkeypatch):
    monkeypatch.setattr(ray, "wait", lambda *a, **k: pytest.fail("nothing to wait for"))
    stop_engine_actors([])


class Stoppable:
    """``shutdown`` leaves a marker, or hangs; ``crash`` ends the process as a dying engine does."""

    def __init__(self, marker: str, hang: bool = False):
        self.marker, self.hang = Path(marker), hang

    def ready(self) -> int:
        return os.getpid()

    def shutdown(self) -> None:
        if self.hang:
            time.sleep(600)
        self.marker.write_text("shut down")

    def crash(self) -> None:
        os._exit(1)


def test_a_hung_or_dead_actor_does_not_block_past_the_grace(ray_local, tmp_path):
    actor_cls = ray.remote(num_cpus=0)(Stoppable)
    answers = actor_cls.remote(str(tmp_path / "answered"))
    hangs = actor_cls.remote(str(tmp_path / "hung"), hang=True)
    dead = actor_cls.remote(str(tmp_path / "dead"))
    ray.get([a.ready.remote() for a in (answers, hangs, dead)])
    with pytest.raises(RayActorError):
        ray.get(dead.crash.remote())

    started = time.monotonic()
    stop_engine_actors([answers, hangs, dead], grace_s=2.0)
    took = time.monotonic() - started
    assert 2.0 <= took < 2.0 + 3.0, f"waited {took:.1f} s: the hung shutdown held it to the grace, no longer"
    assert (tmp_path / "answered").exists() and not (tmp_path / "hung").exists()
    for actor in (answers, hangs, dead):
        with pytest.raises(RayActorError):
            ray.get(actor.ready.remote(), timeout=30)

