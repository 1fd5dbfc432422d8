"""PPO's frozen reference and reward models as their own Ray actors (``--frozen-on actors``).

The driver starts ``count`` named actors (``cai-ppo-<run>-frozen-<i>``, one per learner) in a
placement group of their own: one CPU each, and one GPU each with ``--use-gpu``. Learner rank
``r`` reaches actor ``r % count`` through a ``learners.frozen_client.FrozenClient``, which answers the same two
calls as an in-learner ``core.frozen_models.FrozenModels`` (the ``FrozenScorer`` interface):

* ``ref_logprobs(batch: RolloutBatch, temperature) -> (B, T) float32`` on the batch's device;
* ``score(prompts, completions) -> list[float]``.

So the learner code is the same for both homes. The client sends the batch as token-id lists
(``core.frozen_models.unpack_rollouts``) and the actor packs it exactly as the learner did.

Ray restarts an actor that dies (up to ``FROZEN_MAX_RESTARTS`` times, in its bundle) and runs
the interrupted call again there: both calls are pure functions of their arguments. A call
that still fails, or outlasts the client's timeout, raises ``learners.frozen_client.FrozenActorError`` naming
the actor and what the learner waited for.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from actors.model_source import ModelSource
from core.run_identity import NAMESPACE
from learners.frozen_client import FROZEN_MAX_RESTARTS, FROZEN_TASK_RETRIES
from learners.ppo_config import PPOConfig
from workflows.runtime.placement import WorkerResources, bundle_options, release, reserve_workers


def frozen_actor_names(run: str, count: int) -> list[str]:
    return [f"cai-ppo-{run}-frozen-{i}" for i in range(count)]


def frozen_resources(cfg: PPOConfig) -> WorkerResources:
    """One frozen actor: a CPU, and a GPU with ``--use-gpu``."""
    return WorkerResources(cpus=1, gpus=1 if cfg.learner.use_gpu else 0)


def frozen_demand(cfg: PPOConfig, count: int) -> dict[str, dict[str, float]]:
    """What ``count`` frozen actors hold, for ``placement.check_total_fits``."""
    bundle = frozen_resources(cfg).bundle()
    shape = " + ".join(f"{v:g} {k}" for k, v in bundle.items())
    return {f"{count} frozen model actor(s) x {shape}": {k: v * count for k, v in bundle.items()}}


def start_frozen_actors(cfg: PPOConfig, run: str, count: int, report: Callable[[str], None] | None = None, *,
                        sources: dict[str, ModelSource] | None = None) -> tuple[dict[str, Any], Any]:
    """Named frozen actors in their own placement group, ready, and the group. The caller keeps
    the handles (Ray ends an actor once no handle is left), then kills them and releases the group.

    ``cfg`` has its model fields resolved to folders (``run_ppo``'s ``resolved``; an empty
    ``ref_model`` means the policy). ``sources`` maps ``"ref_model"``/``"reward_model"`` to the
    :class:`ModelSource` each node loads (those the learners get, so a staged model is staged
    once); by default they are made here (``prepare_model``, staging per ``--stage-model``)."""
    import ray

    from actors.frozen_worker import FrozenWorker
    from workflows.runtime.model_preflight import nodes_of_placement_group, preflight_models, prepare_model

    paths = {"ref_model": cfg.ref_model or cfg.policy, "reward_model": cfg.reward_model}
    if sources is None:
        sources = {key: prepare_model(path, path, cfg.cluster) for key, path in paths.items() if path}
    resources = frozen_resources(cfg)
    pg = reserve_workers(count, resources, name=f"cai-ppo-{run}-frozen", timeout_s=cfg.cluster.wait_s,
                         report=report)
    try:
        preflight_models(tuple(sources.values()), nodes_of_placement_group(pg),
                         timeout_s=cfg.cluster.preflight_timeout)
        nodes = ray.util.placement_group_table(pg)["bundles_to_node_id"]
        per_node = Counter(nodes.values())
        names = frozen_actor_names(run, count)
        actors = [
            ray.remote(FrozenWorker).options(name=name, namespace=NAMESPACE, max_restarts=FROZEN_MAX_RESTARTS,
                                             max_task_retries=FROZEN_TASK_RETRIES, **bundle_options(pg, i, resources))
            .remote(sources["ref_model"], sources.get("reward_model", ""), cfg.reward_fn, dtype=cfg.frozen_dtype,
                    use_gpu=cfg.learner.use_gpu, trust_remote_code=cfg.engine.trust_remote_code,
                    cpu_share=per_node[nodes[i]])
            for i, name in enumerate(names)
        ]
        infos = ray.get([actor.ready.remote() for actor in actors], timeout=cfg.cluster.wait_s)
    except BaseException:
        release(pg)
        raise
    if report is not None:
        for name, info in zip(names, infos):
            report(f"{name}: reference and reward in {info['dtype']} on {info['device']} ({info['node']}), "
                   f"{info['parameter_bytes'] / 2**20:.1f} MiB of frozen weights")
    return dict(zip(names, actors)), pg
