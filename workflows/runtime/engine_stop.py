"""Ending engine actors: the engine first, then the actor, in bounded time.

``ray.kill`` ends an actor's process at once. A vLLM engine is more than that process: its
EngineCore is a child process of the actor and, at tensor parallel > 1 (the ``mp`` executor,
``actors.engine.engine_args``), the tensor-parallel workers are the EngineCore's children. None
of them is a Ray worker, and on a GPU each holds its share of the model and KV cache until it
exits. Ray 2.60 reaps them after an unclean death when the node's raylet runs with per-worker
process groups (``RAY_process_group_cleanup_enabled``, on by default in 2.60; docs/cluster.md,
"Engines end cleanly"), but a cluster started with it off would keep them.

So every place that ends engine actors (the shard pool, PPO's rollout engines, `cai models chat`)
first asks each to ``shutdown()`` its engines (vLLM stops the EngineCore, which stops its
workers), waits at most :data:`ENGINE_SHUTDOWN_GRACE_S` for all of them together, and then kills
them. A dead actor answers at once with an error and a hung one is killed when the grace runs
out: neither blocks the caller for longer. Fault drills that simulate a crash kill without this.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

logger = logging.getLogger(__name__)

# vLLM's own shutdown sends the EngineCore SIGTERM and SIGKILLs it after 5 s (``shutdown`` in
# vllm/v1/utils.py, 0.32): the grace lets that sequence finish and the answer come back. Past it,
# the kill and Ray's reaping take over.
ENGINE_SHUTDOWN_GRACE_S = 10.0


def stop_engine_actors(actors: Iterable[Any], *, grace_s: float = ENGINE_SHUTDOWN_GRACE_S) -> None:
    """Ask every actor to ``shutdown()`` its engine, wait up to ``grace_s`` for all of them
    together, then ``ray.kill`` each (no restart), whether it answered, failed, died or hung."""
    import ray
    from ray.exceptions import RayActorError

    actors = list(actors)
    asked: dict[Any, Any] = {}  # shutdown ref -> actor
    for actor in actors:
        try:
            asked[actor.shutdown.remote()] = actor
        except Exception as exc:  # noqa: BLE001 - whatever refuses the call, the kill below still ends it
            logger.warning("could not ask an engine actor to shut down (%s); killing it", exc)
    if asked:
        done, hung = ray.wait(list(asked), num_returns=len(asked), timeout=grace_s)
        for ref in done:
            try:
                ray.get(ref)
            except RayActorError:
                pass  # already dead: nothing left to shut down but what Ray reaps
            except Exception as exc:  # noqa: BLE001 - a failed shutdown still ends in the kill
                logger.warning("an engine actor's shutdown failed (%s); killing it", exc)
        if hung:
            logger.warning("%d engine actor(s) did not shut down within %g s; killing them", len(hung), grace_s)
    for actor in actors:
        ray.kill(actor, no_restart=True)
