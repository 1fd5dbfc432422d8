"""How a PPO learner reaches the rollout actors: sampling with the current policy, on
whichever engines are alive and hold it (Ray plumbing, no math)."""

from __future__ import annotations

import time
from typing import Any

from core.sampling import SamplingConfig
from core.run_identity import NAMESPACE


class RolloutClient:
    """Sends a learner's prompts to the rollout actors that hold the current policy.

    Each round pings every actor: one that does not answer within ``ping_timeout`` (dead, or
    restarting after a crash) sits the round out, and so does one that answers with another
    weights version (back from a restart: the learners bring it up to date together,
    ``learners.weight_sync``). A request that fails because its actor died or
    restarted is sent again to another actor, so a crash costs time, not rows. When no actor
    holds the version, :meth:`generate` returns what it has, and the learners sync.
    """

    def __init__(self, names: list[str], *, wait_timeout: float | None, ping_timeout: float = 2.0):
        import ray

        self.actors = [ray.get_actor(name, namespace=NAMESPACE) for name in names]
        self.ping_timeout, self.wait_timeout = ping_timeout, wait_timeout
        self.live_in_step = len(self.actors)  # fewest actors that held the version during the last step

    def ready_actors(self, version: int) -> list[Any]:
        """The actors that answer now holding weights ``version``; ``[]`` when some answer with
        another version. When none answers, waits (up to ``wait_timeout``) for the first one back."""
        held = answers(self.actors, "weights_version", ping_timeout=self.ping_timeout, wait_timeout=self.wait_timeout)
        return [self.actors[i] for i, answer in held.items() if answer == version]

    def generate(self, prompts: list[list[int]], version: int, sampling: SamplingConfig,
                 seeds: list[int] | None = None, results: list[Any] | None = None,
                 crash: int | None = None) -> list[Any]:
        """One rollout per prompt, filled into ``results`` (where still ``None``); ``seeds``
        (one per prompt) make each answer reproducible, on whichever engine it lands, and
        again after a resend. Returns ``results``: complete, or with ``None`` left where no
        actor held ``version`` (the caller syncs the engines and calls again). ``crash``: the
        fault drill, the index of an actor that dies under its first request here."""
        import ray

        from actors.rollout_worker import StaleWeightsError

        results = [None] * len(prompts) if results is None else results
        todo = [i for i, r in enumerate(results) if r is None]
        doomed = None if crash is None else self.actors[crash]
        for _ in range(len(self.actors) + 2):
            if not todo:
                break
            actors = self.ready_actors(version)
            if not actors:
                break
            self.live_in_step = min(self.live_in_step, len(actors))
            chunks = [todo[i::len(actors)] for i in range(len(actors))]
            calls = {
                actor.generate.remote([prompts[i] for i in chunk], version=version, sampling=sampling,
                                      seeds=None if seeds is None else [seeds[i] for i in chunk],
                                      crash=actor is doomed): chunk
                for actor, chunk in zip(actors, chunks) if chunk
            }
            doomed, todo = None, []
            for ref, chunk in calls.items():
                try:
                    for i, rollout in zip(chunk, ray.get(ref)):
                        results[i] = rollout
                except (ray.exceptions.RayActorError, StaleWeightsError):
                    todo += chunk  # died (or restarted) under the request: another actor takes it
        return results


def answers(actors: list[Any], method: str, *, ping_timeout: float, wait_timeout: float | None) -> dict[int, Any]:
    """What each actor answers to ``method()`` within ``ping_timeout``, by index. An actor that
    is dead or restarting does not answer; when none does, ask again until one is back (a
    restart may wait for a node), saying so every minute, up to ``wait_timeout``."""
    import ray

    started = time.monotonic()
    deadline, note = started + (wait_timeout or float("inf")), started + 30
    while True:
        calls = {getattr(actor, method).remote(): i for i, actor in enumerate(actors)}
        ready, _ = ray.wait(list(calls), num_returns=len(calls), timeout=ping_timeout)
        got = {}
        for ref in ready:
            try:
                got[calls[ref]] = ray.get(ref)
            except ray.exceptions.RayActorError:
                continue  # dead, or its restart has not begun: asked again below
        if got:
            return got
        now = time.monotonic()
        if now > deadline:
            raise RuntimeError(f"no rollout engine answered within --placement-timeout ({wait_timeout} s): all "
                               f"{len(actors)} are dead or restarting")
        if now > note:
            print(f"cai train ppo: waiting for a rollout engine to come back ({now - started:.0f} s; "
                  f"--placement-timeout {wait_timeout} s)", flush=True)
            note = now + 60
        time.sleep(0.5)
