"""Make sure every node that will run a worker can load its model, before any engine starts.

``--model`` is resolved on the driver, so a local folder (``default`` included) is a driver path.
:func:`model_source` turns the resolved value into a :class:`~actors.model_source.ModelSource`;
with ``stage=True`` the files go into Ray's object store so each node can copy them.
:func:`preflight_models` then runs one small task on each node of a placement group: it checks
``"path"`` models, copies ``"staged"`` ones to its local disk (in parallel across nodes) and
downloads ``"hub"`` ones (one node at a time per shared Hugging Face cache), and every node's
problem is reported in one :class:`ModelPreflightError` instead of an engine failing deep inside
vLLM on one node. A node that dies or hangs is reported after ``timeout_s``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Sequence

from actors.model_source import (
    REMEDY,
    ModelNotOnNodeError,
    ModelSource,
    model_files,
    model_fingerprint,
    resolve_on_node,
)
from workflows.runtime.models import ModelNotFoundError, is_hub_id


class ModelPreflightError(FileNotFoundError):
    """One or more nodes cannot load a model; the message lists each node and path.

    A FileNotFoundError, so the CLI prints it as a one-line ``cai: error: ...``."""


def model_source(path: str, *, spec: str, stage: bool, stage_dir: str = "",
                 chunk_bytes: int = 256 << 20) -> ModelSource:
    """Describe a resolved ``--model`` value (see ``workflows.runtime.models.resolve_model``).

    A hub id (not an existing local path) becomes ``"hub"``; a local folder becomes ``"path"``,
    or with ``stage`` ``"staged"``: each file is read in ``chunk_bytes`` chunks and each chunk
    ``ray.put``; each node copies them into ``stage_dir`` (its temp folder when empty). The
    driver owns those objects as long as the returned source is referenced.
    """
    local = Path(path).expanduser()
    if not local.exists():
        if is_hub_id(path):
            return ModelSource(spec=spec, path=path, kind="hub", fingerprint="")
        raise ModelNotFoundError(f"model directory {path!r} (from --model {spec!r}) does not exist")
    local = local.resolve()
    fingerprint = model_fingerprint(local)
    if not stage:
        return ModelSource(spec=spec, path=str(local), kind="path", fingerprint=fingerprint)
    import ray

    blobs = []
    for name, file in model_files(local):
        with open(file, "rb") as handle:
            chunks = iter(lambda: handle.read(chunk_bytes), b"")
            blobs.append((name, tuple(ray.put(chunk) for chunk in chunks)))
    return ModelSource(spec=spec, path=str(local), kind="staged", fingerprint=fingerprint, blobs=tuple(blobs),
                       stage_dir=stage_dir)


def nodes_of_placement_group(pg) -> list[str]:
    """The distinct node ids a ready placement group's bundles sit on, in bundle order."""
    import ray

    bundles = ray.util.placement_group_table(pg)["bundles_to_node_id"]
    return list(dict.fromkeys(node for _, node in sorted(bundles.items()) if node))


def _preflight_node(sources: Sequence[ModelSource]) -> dict:
    """Runs on one node: resolve every source there; problems are returned, not raised, so
    the driver can report all of them at once."""
    import socket

    started = time.monotonic()
    report = {"hostname": socket.gethostname(), "paths": [], "copied_bytes": [], "errors": []}
    for source in sources:
        try:
            path, copied = resolve_on_node(source)
        except ModelNotOnNodeError as error:
            path, copied = None, 0
            report["errors"].append(f"{source.spec!r}: {error.reason}")
        except Exception as error:  # a full disk, a lost object: still one line per node
            path, copied = None, 0
            report["errors"].append(f"{source.spec!r}: {type(error).__name__}: {error}")
        report["paths"].append(path)
        report["copied_bytes"].append(copied)
    report["seconds"] = round(time.monotonic() - started, 2)
    return report


def preflight_models(sources: Sequence[ModelSource], node_ids: Iterable[str], *, timeout_s: float) -> dict[str, dict]:
    """Check (and for staged sources, copy) every model on every node, one task per node.

    Returns ``{node_id: {"hostname", "paths", "copied_bytes", "seconds"}}`` with ``paths[i]``
    the local path of ``sources[i]`` on that node. Raises :class:`ModelPreflightError` listing
    every node that failed, died or did not answer within ``timeout_s``.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    sources, nodes = list(sources), list(dict.fromkeys(node_ids))
    if not nodes:
        return {}
    task = ray.remote(num_cpus=0, max_retries=0)(_preflight_node)
    refs = {
        node: task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False), name="cai-model-preflight"
        ).remote(sources)
        for node in nodes
    }
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    ready = set(ready)
    results, failures = {}, []  # failures: (node_id, problem)
    for node, ref in refs.items():
        if ref not in ready:
            ray.cancel(ref, force=True)  # a hung copy must not linger
            failures.append((node, f"no answer within {timeout_s:g} s (node dead, busy or unreachable)"))
            continue
        try:
            report = ray.get(ref)
        except ray.exceptions.RayError as error:  # the node died, or the task could not be placed
            failures.append((node, f"preflight task failed: {type(error).__name__}: {_first_line(error)}"))
            continue
        failures.extend((node, problem) for problem in report.pop("errors"))
        results[node] = report
    if failures:
        labels = _node_labels()
        unknown = "node {} (not in the cluster)"
        lines = [f"{labels.get(node) or unknown.format(node[:12])}: {problem}" for node, problem in failures]
        raise ModelPreflightError(
            f"model preflight failed on {len({node for node, _ in failures})} of {len(nodes)} node(s):\n  "
            + "\n  ".join(lines)
            + f"\nTo fix: {REMEDY}"
        )
    return results


def preflight_log(sources: Sequence[ModelSource], results: dict[str, dict]) -> list[str]:
    """One line per source for the run log, e.g. ``model X present on 3 node(s)`` or
    ``staged model X to 2 node(s) in 4.1 s``."""
    lines = []
    for i, source in enumerate(sources):
        n_nodes = len(results)
        if source.kind == "hub":
            folders = ", ".join(sorted({report["paths"][i] for report in results.values()}))
            lines.append(f"model {source.spec} is hub id {source.path}: in the Hugging Face cache of "
                         f"{n_nodes} node(s) at {folders}")
        elif source.kind == "path":
            lines.append(f"model {source.spec} present on {n_nodes} node(s) at {source.path}")
        else:
            copied = [report for report in results.values() if report["copied_bytes"][i]]
            if not copied:
                lines.append(f"staged model {source.spec} already on {n_nodes} node(s)")
                continue
            seconds = max(report["seconds"] for report in copied)
            size_mb = max(report["copied_bytes"][i] for report in copied) / 1e6
            lines.append(
                f"staged model {source.spec} to {len(copied)} node(s) in {seconds:.1f} s "
                f"({size_mb:.1f} MB each; {n_nodes - len(copied)} already had it)"
            )
    return lines


def _node_labels() -> dict[str, str]:
    """``node <id prefix> (<ip>, <hostname>)`` for every node Ray knows, dead ones marked."""
    import ray

    return {
        node["NodeID"]: f"node {node['NodeID'][:12]} ({node['NodeManagerAddress']}, "
        f"{node['NodeManagerHostname']}{'' if node['Alive'] else ', dead'})"
        for node in ray.nodes()
    }


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def prepare_model(path: str, spec: str, cluster) -> ModelSource:
    """The :class:`ModelSource` a job hands its workers for a resolved ``--model`` value, staged
    through the object store when ``cluster.stage_model`` (a ``ClusterOptions``) asks for it."""
    if cluster.stage_model:
        from workflows.runtime.ray_session import connect_ray

        connect_ray()  # the chunks go into the object store of the cluster the job runs on
    return model_source(path, spec=spec or path, stage=cluster.stage_model, stage_dir=cluster.stage_dir)
