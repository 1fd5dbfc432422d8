"""How a job behaves on a shared Ray cluster: its run id, how long it waits for placement,
and how its model reaches the nodes. Nested in every job config (flags ``--run-name``,
``--placement-timeout``, ``--stage-model``, ``--stage-dir``; flat keys in YAML)."""

from __future__ import annotations

from dataclasses import dataclass

from core.config import Problem, Rule, at_least, failing, option

DEFAULT_PLACEMENT_TIMEOUT_S = 1800.0
# The least time a node gets to answer the model preflight (a task that starts a worker process
# there, then checks or copies the model): --placement-timeout is how long to wait for nodes, and
# a short one (tests use 3 s) must not turn a busy node's slow worker start into "no answer".
PREFLIGHT_MIN_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ClusterOptions:
    """Run identity, placement waiting and model staging on a shared cluster."""

    run_name: str = option("", "run id naming actors, placement groups, metrics and Ray Train runs; "
                           "default: the output folder's name plus a suffix kept in the run folder")
    placement_timeout: float = option(
        DEFAULT_PLACEMENT_TIMEOUT_S,
        "seconds to wait for the cluster to place workers (autoscalers need minutes); 0 waits forever",
    )
    stage_model: bool = option(False, "copy the model folder to each node's local disk through the object "
                               "store (once per node) instead of expecting it at the same path everywhere")
    stage_dir: str = option("", "absolute node-local folder --stage-model copies into on every node (never the "
                            "shared volume); default: ray-cai-staged in each node's temp folder ($TMPDIR or /tmp)")

    @property
    def wait_s(self) -> float | None:
        """How long to wait for the cluster, in seconds: for placement, for an actor that restarts
        (it may wait for a node), for the learners to start. None waits forever
        (``--placement-timeout 0``). Every wait reads this, never the flag itself."""
        return self.placement_timeout or None

    @property
    def preflight_timeout(self) -> float | None:
        """Seconds the model preflight waits for each node: :attr:`wait_s`, at least
        ``PREFLIGHT_MIN_TIMEOUT_S``; None (forever) with it."""
        return None if self.wait_s is None else max(self.wait_s, PREFLIGHT_MIN_TIMEOUT_S)

    def problems(self) -> list[Problem]:
        run_name = Rule("at most 48 letters, digits, '-', '_' or '.'",
                        lambda name: all(c.isalnum() or c in "-_." for c in name) and len(name) <= 48)
        stage_dir = Rule("an absolute path, or empty", lambda path: not path or path.startswith("/"))
        return failing({"run_name": run_name(self.run_name), "placement_timeout": at_least(0)(self.placement_timeout),
                        "stage_dir": stage_dir(self.stage_dir)})
