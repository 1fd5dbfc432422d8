"""The cluster's GPUs, and what follows from them: device defaults and the GPU memory to plan for.

**Defaults.** ``--gpus-per-worker`` and ``--use-gpu`` default to None, "decide on the cluster":
once a command has joined its cluster (:func:`workflows.runtime.ray_session.connect_ray`),
:func:`on_devices` sets them to GPUs when any alive node has one (each engine worker gets
``--tensor-parallel`` GPUs, the learners and PPO's rollout engines take GPUs) and to CPUs when
none has (exactly what a CPU-only cluster always got). The config then travels resolved, so
every actor and Train loop sees the same value. A value the user gave is never changed. An
autoscaling cluster whose GPU nodes may all be down when a job starts should say
``--use-gpu`` / ``--gpus-per-worker`` itself, as ``configs/cluster.yaml`` does.

**GPU memory** (``--gpu-memory-gib auto|N`` of ``cai plan`` and ``cai run``). ``auto`` reads
each alive GPU node's memory: the node's ``ray-cai/gpu-memory-gib`` label when its operator set
one (``ray start --labels``, a KubeRay group's ``rayStartParams``), otherwise a task pinned to
the node reads NVML (``nvidia-smi`` where the bindings are missing). The plan checks against the
smallest, and names that node. Without ``RAY_ADDRESS`` the cluster is this machine (the one a
command would start), read the same way without starting Ray.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from core.config import ConfigError

GPU_MEMORY_LABEL = "ray-cai/gpu-memory-gib"
GPU_MEMORY_HELP = ("memory of each GPU, in GiB, that every stage is checked against; auto: read on the cluster's "
                   f"GPU nodes (the node label {GPU_MEMORY_LABEL}, else NVML), the smallest, or this machine's "
                   "GPUs without RAY_ADDRESS")
GpuMemory = float | Literal["auto"]
PROBE_TIMEOUT_S = 60.0


# -- device defaults ------------------------------------------------------------------------


def on_devices(cfg: Any, gpus: bool) -> Any:
    """``cfg`` with its unset GPU options (None) decided for a cluster with (``gpus``) or without GPUs.

    A config's ``pool.gpus_per_worker`` becomes its engine's ``tensor_parallel`` on GPUs, 0 on
    CPUs; its ``learner.use_gpu`` becomes ``gpus``. Any other config is returned as it is.
    """
    changes: dict[str, Any] = {}
    pool = getattr(cfg, "pool", None)
    if pool is not None and pool.gpus_per_worker is None:
        changes["pool"] = pool_on_devices(pool, cfg.engine.tensor_parallel, gpus)
    learner = getattr(cfg, "learner", None)
    if learner is not None and learner.use_gpu is None:
        changes["learner"] = replace(learner, use_gpu=gpus)
    return replace(cfg, **changes) if changes else cfg


def pool_on_devices(pool: Any, tensor_parallel: int, gpus: bool) -> Any:
    """A sharded stage's pool with ``gpus_per_worker`` decided (a given value stays)."""
    if pool.gpus_per_worker is not None:
        return pool
    return replace(pool, gpus_per_worker=float(tensor_parallel) if gpus else 0.0)


def cluster_has_gpus() -> bool:
    """Whether an alive node of the connected cluster has a GPU."""
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def joined_on_devices(cfg: Any) -> Any:
    """``cfg`` decided for the cluster this command runs on, joining it (or starting a local
    instance) only when an option is unset: a config that says everything needs no cluster."""
    if on_devices(cfg, gpus=False) is cfg:
        return cfg
    from workflows.runtime.ray_session import connect_ray

    connect_ray()
    return on_devices(cfg, cluster_has_gpus())


# -- GPU memory ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuNode:
    """One node's GPUs: how many Ray counts, their kind, and the memory of the smallest."""

    node_id: str
    address: str
    gpus: float
    kind: str  # Ray's accelerator type (``A10G``, ``H100``), or '' when Ray knows none
    memory_gib: float | None  # None: could not be read
    source: str  # the label, NVML or nvidia-smi; or why it could not be read

    def describe(self) -> str:
        kind = f"{self.kind} " if self.kind else ""
        return f"node {self.address} ({self.node_id[:12]}): {self.gpus:g} {kind}GPU(s)"


@dataclass(frozen=True)
class GpuBudget:
    """The GPU memory a plan checks against, and what it was read from."""

    gib: float | None  # None: the cluster has no GPU
    origin: str

    @property
    def bytes(self) -> int | None:
        return None if self.gib is None else int(self.gib * (1 << 30))


def gpu_memory_setting(value: Any, what: str = "--gpu-memory-gib") -> GpuMemory:
    """``auto`` or a positive number of GiB; anything else is a :class:`ConfigError` naming ``what``."""
    if value == "auto":
        return "auto"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    raise ConfigError(f"{what} {value!r}: expected auto or a number of GiB above 0")


def gpu_budget(setting: GpuMemory, *, read_nodes: Callable[[], list[GpuNode]] | None = None) -> GpuBudget:
    """The GPU memory for ``setting``: the number given, or (``auto``) the smallest GPU of the
    cluster's GPU nodes. A GPU node whose memory cannot be read is an error naming it."""
    import os

    if setting != "auto":
        return GpuBudget(float(setting), "as given (--gpu-memory-gib, or gpu_memory_gib in the config)")
    nodes = (read_nodes or cluster_gpu_nodes)()
    if not nodes:
        return GpuBudget(None, f"no node of the cluster at {os.environ['RAY_ADDRESS']} has one"
                         if os.environ.get("RAY_ADDRESS") else "this machine has none (without RAY_ADDRESS the "
                         "cluster is this machine)")
    unread = [node for node in nodes if node.memory_gib is None]
    if unread:
        raise ConfigError("--gpu-memory-gib auto: could not read the GPU memory of "
                          + "; ".join(f"{node.describe()}: {node.source}" for node in unread)
                          + f". Give --gpu-memory-gib N, or label the node {GPU_MEMORY_LABEL}=N")
    smallest = min(nodes, key=lambda node: node.memory_gib)
    others = f" (the smallest of {len(nodes)} GPU nodes)" if len(nodes) > 1 else ""
    return GpuBudget(smallest.memory_gib, f"{smallest.describe()}, read from {smallest.source}{others}")


def cluster_gpu_nodes() -> list[GpuNode]:
    """The GPU nodes of the cluster this command would run on: ``RAY_ADDRESS``'s, read through
    Ray, or (without it) this machine, read directly."""
    import os

    if not os.environ.get("RAY_ADDRESS"):
        return this_machine_gpus()
    from workflows.runtime.ray_session import connect_ray

    connect_ray()
    return ray_gpu_nodes()


def this_machine_gpus() -> list[GpuNode]:
    import socket

    memory, source = read_gpu_memory()
    if not memory:
        return []
    return [GpuNode("this machine", socket.gethostname(), len(memory), "", min(memory), source)]


def ray_gpu_nodes(timeout_s: float = PROBE_TIMEOUT_S) -> list[GpuNode]:
    """Every alive node with a GPU: its label's memory, or what a task pinned to it reads."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [node for node in ray.nodes() if node.get("Alive") and node["Resources"].get("GPU", 0) > 0]
    probe = ray.remote(num_cpus=0)(read_gpu_memory)  # no GPU asked: it must not wait for busy ones
    pending = {}
    for node in nodes:
        if _labelled_memory(node) is None:
            strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            pending[node["NodeID"]] = probe.options(scheduling_strategy=strategy).remote()
    ray.wait(list(pending.values()), num_returns=len(pending), timeout=timeout_s)  # one deadline for all
    read = {}
    for node_id, ref in pending.items():
        try:
            memory, source = ray.get(ref, timeout=0)
        except ray.exceptions.GetTimeoutError:
            memory, source = [], f"its probe gave no answer within {timeout_s:g} s"
        except Exception as exc:  # noqa: BLE001 - a node that cannot answer is named, not fatal here
            memory, source = [], f"its probe failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        read[node_id] = (min(memory), source) if memory else (None, source)
    found = []
    for node in nodes:
        labelled = _labelled_memory(node)
        memory, source = (labelled, f"its label {GPU_MEMORY_LABEL}") if labelled is not None else read[node["NodeID"]]
        found.append(GpuNode(node["NodeID"], node.get("NodeManagerAddress", "?"), node["Resources"]["GPU"],
                             _accelerator(node), memory, source))
    return found


def _labelled_memory(node: dict) -> float | None:
    raw = (node.get("Labels") or {}).get(GPU_MEMORY_LABEL)
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"node {node.get('NodeManagerAddress', '?')}: label {GPU_MEMORY_LABEL}={raw!r} is not "
                          "a number of GiB") from None


def _accelerator(node: dict) -> str:
    """Ray's ``accelerator_type:<kind>`` resource of an NVIDIA node (``A10G``, ``H100``)."""
    return next((key.split(":", 1)[1] for key in node["Resources"] if key.startswith("accelerator_type:")), "")


def read_gpu_memory() -> tuple[list[float], str]:
    """The total memory in GiB of each GPU of this machine, and how it was read: NVML (vLLM's
    GPU build brings the bindings), else ``nvidia-smi``. ``([], why)`` when neither can."""
    try:
        import pynvml
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
            try:
                handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
                return [pynvml.nvmlDeviceGetMemoryInfo(h).total / (1 << 30) for h in handles], "NVML"
            finally:
                pynvml.nvmlShutdown()
        except pynvml.NVMLError as exc:
            nvml_error = f"NVML: {exc}"
    else:
        nvml_error = "no NVML bindings (pynvml)"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return [], f"{nvml_error}, no nvidia-smi"
    done = subprocess.run([smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"], capture_output=True,
                          text=True, timeout=30, check=False)
    if done.returncode != 0:
        return [], f"{nvml_error}; nvidia-smi failed: {(done.stderr or done.stdout).strip()[:200]}"
    return parse_smi_memory(done.stdout), "nvidia-smi"


def parse_smi_memory(text: str) -> list[float]:
    """GiB per GPU from ``nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits`` (MiB lines)."""
    return [float(line) / 1024 for line in text.split() if line.strip()]
