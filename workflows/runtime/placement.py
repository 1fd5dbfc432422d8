"""Reserve cluster resources for a pool of engine workers: one placement-group bundle each.

Each worker hosts one vLLM engine. With tensor parallel N on GPUs, vLLM starts its N TP
workers inside the actor (multiprocessing executor) on the GPUs Ray assigned to the actor,
so those N GPUs must sit on ONE node: one bundle ``{"CPU": c, "GPU": N}`` per worker gives
that, because Ray never splits a bundle across nodes. The default ``SPREAD`` strategy puts
bundles on different nodes where it can (more memory bandwidth and no shared NIC per engine)
and packs them where it cannot.

Reserving everything up front means a pool waits in one place, for as long as
``--placement-timeout`` allows (autoscalers need minutes to add a node), saying every ~30 s
what is pending and what the cluster has; on timeout it fails with what was asked and what
each node has, instead of actors that wait forever.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.cluster_options import DEFAULT_PLACEMENT_TIMEOUT_S

if TYPE_CHECKING:
    from ray.util.placement_group import PlacementGroup

STRATEGIES = ("SPREAD", "PACK", "STRICT_SPREAD", "STRICT_PACK")
# Guards floor() against float noise such as 0.6 / 0.2 == 2.9999999999999996.
_EPSILON = 1e-9
REPORT_EVERY_S = 30.0  # how often a wait for placement says what it waits for
FIRST_REPORT_S = 5.0  # ... and the first time, so a waiting run is never silent for long


@dataclass(frozen=True)
class WorkerResources:
    """What one worker (one engine actor) needs, all on one node.

    ``gpus`` is per worker: with tensor parallel N on GPUs it is N; on CPU-only clusters 0.
    """

    cpus: float = 1.0
    gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.cpus < 0 or self.gpus < 0:
            raise ValueError(f"WorkerResources: cpus ({self.cpus}) and gpus ({self.gpus}) must be >= 0")
        if self.cpus == 0 and self.gpus == 0:
            raise ValueError("WorkerResources: a worker needs cpus > 0 or gpus > 0")
        if self.gpus > 1 and self.gpus != int(self.gpus):
            # Ray accepts fractions of one GPU only; 1.5 GPUs cannot be assigned.
            raise ValueError(f"WorkerResources.gpus above 1 must be a whole number, got {self.gpus}")

    def bundle(self) -> dict[str, float]:
        """The placement-group bundle, e.g. ``{"CPU": 1.0, "GPU": 2.0}`` (no GPU key when 0)."""
        bundle = {"CPU": float(self.cpus)}
        if self.gpus:
            bundle["GPU"] = float(self.gpus)
        return bundle


class PlacementError(RuntimeError):
    """The cluster could not host the requested workers within the timeout."""


def workers_that_fit(resources: WorkerResources, nodes: list[dict] | None = None) -> int:
    """How many worker bundles the nodes can hold in total, packing each node on its own.

    A bundle cannot span nodes, so the count is the sum over nodes of
    ``min(cpu_i // cpus, gpu_i // gpus)`` (a zero requirement does not limit). ``nodes`` are
    per-node resource dicts (``{"CPU": 2, "GPU": 2}``) or records from ``ray.nodes()``
    (their ``"Resources"``; dead ones are skipped); by default the alive nodes of the
    connected cluster. Totals, not what is free now: other actors may hold some.
    """
    if nodes is None:
        nodes = _alive_nodes()
    return sum(_fit_on_node(resources, _resources_of(node)) for node in nodes if node.get("Alive", True))


def reserve_workers(
    n_workers: int,
    resources: WorkerResources,
    *,
    strategy: str = "SPREAD",
    timeout_s: float | None = DEFAULT_PLACEMENT_TIMEOUT_S,
    name: str | None = None,
    report: Callable[[str], None] | None = None,
    report_every_s: float = REPORT_EVERY_S,
) -> PlacementGroup:
    """Create a placement group with one bundle per worker and wait until it is placed.

    Waits the full ``timeout_s`` (None: forever; ``ClusterOptions.wait_s``) even when the cluster is too small now, because
    an autoscaling cluster may still add nodes; every ``report_every_s`` it tells ``report``
    what is pending and what the cluster has. On timeout the group is removed (so it does
    not hold a partial reservation) and :class:`PlacementError` says what was asked and what
    each node has.
    """
    import ray
    from ray.util import placement_group

    if n_workers < 1:
        raise ValueError(f"reserve_workers: n_workers must be >= 1, got {n_workers}")
    if strategy not in STRATEGIES:
        raise ValueError(f"reserve_workers: strategy must be one of {STRATEGIES}, got {strategy!r}")
    if timeout_s is not None and timeout_s <= 0:
        raise ValueError(f"reserve_workers: timeout_s must be > 0 (None waits forever), got {timeout_s}")
    pg = placement_group([resources.bundle() for _ in range(n_workers)], strategy=strategy, name=name or "")
    ready_ref = pg.ready()
    started = time.monotonic()
    interval = min(FIRST_REPORT_S, report_every_s)  # say soon that it waits, then every report_every_s
    while True:
        waited = time.monotonic() - started
        left = interval if timeout_s is None else min(interval, timeout_s - waited)
        interval = report_every_s
        ready, _ = ray.wait([ready_ref], timeout=max(left, 0))
        if ready:
            return pg
        waited = time.monotonic() - started
        if timeout_s is not None and waited >= timeout_s:
            release(pg)
            raise PlacementError(_unplaceable_message(n_workers, resources, strategy, timeout_s))
        if report is not None:
            report(pending_message(pg, waited, timeout_s))


def unplaced_bundles(pg: PlacementGroup) -> list[int]:
    """Indexes of the group's bundles that have no node now (pending, or lost with a node)."""
    from ray.util import placement_group_table

    table = placement_group_table(pg)
    if table.get("state") == "CREATED":
        return []
    placed = table.get("bundles_to_node_id", {})
    return [i for i in range(pg.bundle_count) if not placed.get(i)]


def pending_message(pg: PlacementGroup, waited_s: float, timeout_s: float | None) -> str:
    """One line: how long the group has waited, which bundles wait, what the nodes have."""
    from ray.util import placement_group_table

    table = placement_group_table(pg)
    limit = "(no timeout)" if timeout_s is None else f"of {timeout_s:g} s"
    return (f"waiting {waited_s:.0f} s {limit} for placement group {table.get('name') or pg.id.hex()[:8]} "
            f"({table.get('state', '?')}): {pending_detail(pg)}")


def pending_detail(pg: PlacementGroup) -> str:
    """Which of the group's bundles have no node, and what the alive nodes have."""
    import ray

    waiting = unplaced_bundles(pg) or list(range(pg.bundle_count))
    shapes = sorted({str(pg.bundle_specs[i]) for i in waiting})
    free = ray.available_resources()
    return (f"{len(waiting)} of {pg.bundle_count} bundle(s) {', '.join(shapes)} pending; cluster: {cluster_summary()}, "
            f"free CPU {free.get('CPU', 0):g}, GPU {free.get('GPU', 0):g}")


def cluster_summary() -> str:
    """``2 node(s): 10.0.0.1 CPU 8 GPU 2; ...`` for messages."""
    nodes = _alive_nodes()
    parts = [
        f"{node.get('NodeManagerAddress', '?')} CPU {_resources_of(node).get('CPU', 0):g} "
        f"GPU {_resources_of(node).get('GPU', 0):g}"
        for node in nodes
    ]
    return f"{len(nodes)} alive node(s)" + (": " + "; ".join(parts) if parts else "")


def bundle_options(pg: PlacementGroup, index: int, resources: WorkerResources) -> dict[str, Any]:
    """Keyword arguments for ``ActorClass.options(...)`` that run the actor in bundle ``index``.

    Child tasks are captured so anything the engine starts through Ray stays in the bundle.
    """
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if not 0 <= index < pg.bundle_count:
        raise IndexError(f"bundle index {index} out of range: the placement group has {pg.bundle_count} bundles")
    return {
        "num_cpus": resources.cpus,
        "num_gpus": resources.gpus,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=pg,
            placement_group_bundle_index=index,
            placement_group_capture_child_tasks=True,
        ),
    }


def release(pg: PlacementGroup) -> None:
    """Remove the placement group (and kill actors still in it); a no-op if already gone."""
    from ray.util import remove_placement_group

    try:
        remove_placement_group(pg)
    except Exception:  # noqa: BLE001 - already removed, or the cluster is gone: nothing to free
        pass


def _fit_on_node(resources: WorkerResources, available: dict[str, float]) -> int:
    limits = []
    for key, need in resources.bundle().items():
        if need > 0:
            limits.append(math.floor(available.get(key, 0.0) / need + _EPSILON))
    return max(0, min(limits))


def _resources_of(node: dict) -> dict[str, float]:
    return node["Resources"] if "Resources" in node else node


def _alive_nodes() -> list[dict]:
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


def _unplaceable_message(n_workers: int, resources: WorkerResources, strategy: str, timeout_s: float) -> str:
    nodes = _alive_nodes()
    fit = workers_that_fit(resources, nodes)
    lines = [
        f"could not reserve {n_workers} workers x {resources.bundle()} (one bundle each, "
        f"strategy {strategy}) within {timeout_s:g} s.",
        f"The cluster has {len(nodes)} alive node(s):",
        *_node_lines(nodes, resources),
    ]
    if fit < n_workers:
        lines.append(
            f"Only {fit} of {n_workers} such workers fit (a worker's GPUs must be on one node): "
            "ask for fewer workers, a smaller tensor_parallel, or add nodes."
        )
    else:
        lines.append(
            f"{fit} such workers would fit in total, so other actors or placement groups hold "
            "the resources (see `ray status`), or nodes are still starting."
        )
    if strategy.startswith("STRICT_"):
        lines.append(f"Strategy {strategy} also constrains where bundles may go; SPREAD is the most lenient.")
    return "\n".join(lines)


def _node_lines(nodes: list[dict], resources: WorkerResources) -> list[str]:
    """One line per node: its name, what it has, and how many such workers it holds."""
    lines = []
    for node in nodes:
        total = _resources_of(node)
        lines.append(
            f"  node {node.get('NodeID', '?')[:12]} ({node.get('NodeManagerAddress', '?')}): "
            f"CPU {total.get('CPU', 0):g}, GPU {total.get('GPU', 0):g} -> "
            f"{_fit_on_node(resources, total)} such worker(s)"
        )
    return lines


def refuse_unplaceable(resources: WorkerResources, *, fixed: bool, what: str) -> None:
    """On a ``fixed`` cluster (one this process started, which nothing will grow), refuse a
    worker no node can hold (GPUs asked of a machine without any) before anything starts, naming
    each node and what it has. Elsewhere nodes may still join: placement waits and reports."""
    nodes = _alive_nodes()
    if not fixed or workers_that_fit(resources, nodes):
        return
    shape = " + ".join(f"{amount:g} {key}" for key, amount in resources.bundle().items())
    lines = [f"{what}: each worker needs {shape} on one node, and no node of this local cluster has that:",
             *_node_lines(nodes, resources)]
    if resources.gpus and not any(_resources_of(node).get("GPU", 0) for node in nodes):
        lines.append("No node has a GPU: leave --gpus-per-worker unset (engines on CPUs here), or join a GPU "
                     "cluster with RAY_ADDRESS.")
    raise PlacementError("\n".join(lines))


def check_total_fits(parts: dict[str, dict[str, float]], *, fixed: bool, what: str,
                     report: Callable[[str], None] | None = None) -> None:
    """Check that the resource groups a job holds at once fit the cluster's totals.

    ``parts`` maps a description (``"2 rollout engines x 1 CPU"``) to the resources it needs in
    total. On a ``fixed`` cluster (one this process started, which nothing will grow) a job
    that cannot fit is refused before anything starts, naming both figures; elsewhere an
    autoscaler may add nodes, so the shortfall is only reported and placement waits.
    """
    import ray

    need: dict[str, float] = {}
    for resources in parts.values():
        for key, amount in resources.items():
            need[key] = need.get(key, 0.0) + amount
    have = ray.cluster_resources()
    short = {k: v for k, v in need.items() if v > have.get(k, 0.0) + _EPSILON}
    if not short:
        return
    wanted = ", ".join(f"{k} {v:g}" for k, v in short.items())
    owned = ", ".join(f"{k} {have.get(k, 0.0):g}" for k in short)
    detail = f"{what} needs {wanted} at once ({' + '.join(parts)}), but the cluster has {owned}"
    if fixed:
        raise PlacementError(f"{detail}: ask for fewer workers or fewer resources per worker, or join a larger "
                             "cluster with RAY_ADDRESS")
    if report is not None:
        report(f"{detail} now; waiting up to --placement-timeout for nodes to join")


class PoolPlacements:
    """Where each worker slot of a pool runs, and how an elastic pool grows.

    The first ``n_workers`` slots share the placement group :func:`reserve_workers` placed, one
    bundle each. Each worker an elastic pool adds later gets a group of its own, not waited for:
    its actor waits for the bundle, and the pool gives it shards only once it is up. The pool
    adds workers while the alive nodes hold more of them than it has (the totals, as
    :func:`workers_that_fit` counts them), up to ``limit``, and only once the workers it added
    before have their nodes, so it never piles up requests that nothing can place.

    With ``--max-workers`` on an elastic pool, :meth:`ask_autoscaler` asks for room for that
    many workers (``ray.autoscaler.sdk.request_resources``: capacity in total, counting
    what runs; it bypasses the autoscaler's upscaling speed limit) and withdraws the request once
    every shard is handed out. Ray 2.60 keeps one such request per cluster, the last call's: two
    elastic runs on one autoscaling cluster replace each other's, and the first to finish
    withdraws both (the other still grows onto nodes that join). On a cluster without an
    autoscaler nothing reads it.
    """

    def __init__(self, resources: WorkerResources, *, name: str, limit: int, elastic: bool,
                 note: Callable[[str], None] = lambda message: None):
        self.resources, self.name, self.limit, self.elastic, self.note = resources, name, limit, elastic, note
        self.first = 0
        self.slots: dict[int, tuple[PlacementGroup, int]] = {}
        self.began, self.began_at = time.monotonic(), time.time()  # the pool's clock, and its start in Unix time
        self.request = {"workers": 0, "at": None, "withdrawn_at": None}

    def ask_autoscaler(self, workers: int, *, have: int) -> None:
        """Ask for room for ``workers`` in all, when an elastic pool may grow beyond ``have``;
        before the first placement is waited for, so new nodes come up together."""
        if self.elastic and workers > have:
            self._ask(workers)
            self.request.update(workers=workers, at=self._since())
            self.note(f"asked the autoscaler for room for {workers} worker(s) x {self.resources.bundle()}")

    def placed(self, pg: PlacementGroup, n_workers: int) -> None:
        """The first ``n_workers`` slots are the bundles of ``pg`` (from :func:`reserve_workers`)."""
        self.first = n_workers
        self.slots.update({slot: (pg, slot) for slot in range(n_workers)})

    def options(self, slot: int) -> dict[str, Any]:
        """``bundle_options`` for the slot's actor; a slot the pool added gets its group here."""
        if slot not in self.slots:
            from ray.util import placement_group

            self.slots[slot] = (placement_group([self.resources.bundle()], name=f"{self.name}-{slot}"), 0)
        group, bundle = self.slots[slot]
        return bundle_options(group, bundle, self.resources)

    def groups(self) -> list[PlacementGroup]:
        return list({id(group): group for group, _ in self.slots.values()}.values())

    def unplaced(self) -> str | None:
        """What waits for a node (:func:`pending_detail` of the first group that does), or None."""
        waiting = [group for group in self.groups() if unplaced_bundles(group)]
        return pending_detail(waiting[0]) if waiting else None

    def grow(self, slots: int, queued: int) -> int:
        """How many workers to add now, with ``queued`` shards not yet handed out."""
        if not self.elastic:
            return 0
        if not queued:
            self.withdraw("every shard is handed out")
            return 0
        added = [group for group, _ in list(self.slots.values())[self.first:]]
        if slots >= self.limit or any(unplaced_bundles(group) for group in added):
            return 0
        more = min(workers_that_fit(self.resources), self.limit, slots + queued) - slots
        if more > 0:
            self.note(f"{more} more worker(s) fit the cluster now: the pool grows to {slots + more}")
        return max(more, 0)

    def withdraw(self, why: str) -> None:
        """Withdraw the request to the autoscaler, once."""
        if self.request["workers"] and self.request["withdrawn_at"] is None:
            self._ask(0)
            self.request["withdrawn_at"] = self._since()
            self.note(f"{why}: withdrew the request to the autoscaler")

    def release(self) -> None:
        self.withdraw("the pool has ended")
        for group in self.groups():
            release(group)

    def _ask(self, workers: int) -> None:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[self.resources.bundle() for _ in range(workers)])

    def _since(self) -> float:
        return round(time.monotonic() - self.began, 1)
