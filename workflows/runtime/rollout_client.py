"""How a PPO learner reaches the rollout actors: sampling with the current policy, on
whichever engines are alive, and keeping their weights current (Ray plumbing, no math)."""

from __future__ import annotations

import time
from typing import Any

from core.sampling import SamplingConfig
from workflows.runtime.ray_session import NAMESPACE


class RolloutClient:
    """Sends a learner's prompts to the rollout actors and keeps their weights current.

    Each step pings every actor: one that does not answer within ``ping_timeout`` (dead, or
    restarting after a crash) sits the step out; one that answers with an old weights
    version gets the current weights first. A request that fails because its actor died is
    sent again to another actor, so a crash costs time, not rows.

    Without ``policy_blob`` (an FSDP learner other than rank 0: it holds only a shard of the
    policy) the client never pushes: it waits until rank 0 has brought an engine up to date.
    """

    def __init__(self, names: list[str], policy_blob, *, wait_timeout: float | None, ping_timeout: float = 2.0):
        import ray

        self.actors = [ray.get_actor(name, namespace=NAMESPACE) for name in names]
        self.policy_blob = policy_blob  # () -> safetensors bytes of the current policy, or None: rank 0 pushes
        self.ping_timeout, self.wait_timeout = ping_timeout, wait_timeout
        self.restarts_seen = 0  # actors found restarted (back with old weights)
        self.live_in_step = len(self.actors)  # fewest actors that answered during the last generate

    def ready_actors(self, version: int, *, after_update: bool = False) -> list[Any]:
        """The actors that answer now, each holding weights ``version`` (pushed if not)."""
        deadline = time.monotonic() + (self.wait_timeout or float("inf"))
        while True:
            live = self._current_actors(version, after_update)
            if live:
                return live
            if time.monotonic() > deadline:
                raise RuntimeError(f"no rollout actor holds weights version {version} after --placement-timeout "
                                   f"({self.wait_timeout} s): learner rank 0 pushes them")
            time.sleep(0.5)  # learner rank 0 is pushing the current weights

    def _current_actors(self, version: int, after_update: bool) -> list[Any]:
        import ray

        pings = {actor.weights_version.remote(): actor for actor in self.actors}
        ready, _ = ray.wait(list(pings), num_returns=len(pings), timeout=self.ping_timeout)
        if not ready:  # all down: wait for the first one back (a restart may wait for a node)
            ready, _ = ray.wait(list(pings), num_returns=1, timeout=self.wait_timeout)
        live, stale = [], []
        for ref in ready:
            try:
                held = ray.get(ref)
            except ray.exceptions.RayActorError:
                continue
            if held == version:
                live.append(pings[ref])
            else:
                stale.append(pings[ref])
                # after an update every engine is one version behind; further behind: restarted
                self.restarts_seen += held < version - 1 or not after_update
        if stale and self.policy_blob is not None:
            self.push(stale, version)
            live += stale
        if not live and not stale:
            raise RuntimeError(f"no rollout actor answered within --placement-timeout ({self.wait_timeout} s)")
        return live

    def push(self, actors: list[Any], version: int) -> float:
        """Load the current policy into ``actors``; returns seconds."""
        import ray

        started = time.monotonic()
        blob = ray.put(self.policy_blob())
        for ref in [actor.load_weights.remote(blob, version) for actor in actors]:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                pass  # died meanwhile: it gets the weights when it is back
        return time.monotonic() - started

    def generate(self, prompts: list[list[int]], version: int, sampling: SamplingConfig,
                 seeds: list[int] | None = None) -> list[Any]:
        """One rollout per prompt; ``seeds`` (one per prompt) make each answer reproducible,
        on whichever engine it lands, and again after a resend."""
        import ray

        from actors.rollout_worker import StaleWeightsError

        results: list[Any] = [None] * len(prompts)
        todo = list(range(len(prompts)))
        self.live_in_step = len(self.actors)
        for _ in range(len(self.actors) + 2):
            actors = self.ready_actors(version)
            self.live_in_step = min(self.live_in_step, len(actors))
            chunks = [todo[i::len(actors)] for i in range(len(actors))]
            calls = {
                actor.generate.remote([prompts[i] for i in chunk], version=version, sampling=sampling,
                                      seeds=None if seeds is None else [seeds[i] for i in chunk]): chunk
                for actor, chunk in zip(actors, chunks) if chunk
            }
            todo = []
            for ref, chunk in calls.items():
                try:
                    for i, rollout in zip(chunk, ray.get(ref)):
                        results[i] = rollout
                except (ray.exceptions.RayActorError, StaleWeightsError):
                    todo += chunk  # died (or restarted) under the request: another actor takes it
            if not todo:
                return results
        raise RuntimeError("rollouts kept failing: every rollout actor died repeatedly")
