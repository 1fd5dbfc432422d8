"""How a PPO learner reaches its frozen reference and reward models when they run in their own
actors (``--frozen-on actors``; the driver starts them, ``workflows/runtime/frozen_group.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from core.frozen_models import unpack_rollouts
from core.ppo_policy import RolloutBatch
from core.run_identity import NAMESPACE

FROZEN_MAX_RESTARTS = 3  # as the rollout actors
FROZEN_TASK_RETRIES = 2  # a call interrupted by a crash runs again on the restarted actor


class FrozenActorError(RuntimeError):
    """A learner's frozen actor did not answer (dead for good, or past the timeout)."""


class FrozenClient:
    """A learner's frozen models in its own actor: rank ``r`` uses actor ``r % len(names)``.

    ``timeout`` (seconds, None: no limit) bounds each call, a restart of the actor included
    (which may wait for a node: pass ``--placement-timeout``)."""

    def __init__(self, names: Sequence[str], rank: int, *, timeout: float | None = None):
        import ray

        if not names:
            raise ValueError("FrozenClient: no frozen actors to call (--frozen-on actors starts one per learner)")
        self.name = names[rank % len(names)]
        self.actor = ray.get_actor(self.name, namespace=NAMESPACE)
        self.timeout = timeout

    def ref_logprobs(self, batch: RolloutBatch, temperature: float = 1.0):
        """(B, T) float32 on the batch's device (``core.frozen_models.FrozenScorer``)."""
        prompts, responses, pad_id = unpack_rollouts(batch)
        ref = self.actor.ref_logprobs.remote(prompts, responses, pad_id, temperature)
        return self._get(ref, f"reference log-probs of {len(prompts)} rollouts").to(batch.input_ids.device)

    def score(self, prompts: Sequence[Any], completions: Sequence[str]) -> list[float]:
        return self._get(self.actor.score.remote(list(prompts), list(completions)),
                         f"reward scores of {len(completions)} answers")

    def _get(self, ref, what: str):
        import ray

        try:
            return ray.get(ref, timeout=self.timeout)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref)
            raise FrozenActorError(f"waited {self.timeout:g} s for {what} from frozen actor {self.name}: it is "
                                   "restarting, waiting for a node, or too slow (see `ray status` and its log; "
                                   "--placement-timeout sets this limit)") from None
        except ray.exceptions.RayActorError as error:
            raise FrozenActorError(f"frozen actor {self.name} died computing {what} and Ray did not bring it back "
                                   f"({FROZEN_MAX_RESTARTS} restarts at most): {error}") from error
