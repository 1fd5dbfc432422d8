"""A training run's ``metrics.jsonl``, written line by line while the run trains.

:class:`RunLog` is a small Ray actor that the driver starts on its own node (where ``--out``
is), so learners on any node can hand it one row per step as the step ends. Each row also
sets the run's Ray metrics gauges (:class:`actors.metrics.StepGauges`), so Grafana and
``cai status`` follow the same numbers.

Rows are keyed by ``step``. A learner restarted from an older checkpoint repeats steps it had
already logged; the log then drops its rows from that step on before appending, so every step
appears once, as last computed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from actors.metrics import StepGauges

METRICS_FILE = "metrics.jsonl"


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (a torn last line, from a crash mid-write, is skipped)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class RunLog:
    def __init__(self, path: str, stage: str, run: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.gauges = StepGauges(stage, run)
        rows = read_rows(self.path)
        if self.path.exists() and not self.path.read_text(encoding="utf-8").endswith("\n"):
            self._write(rows)  # drop a line torn by a crash, so the next row starts on its own line
        self.last_step = max((row.get("step", 0) for row in rows), default=0)

    def _write(self, rows: list[dict[str, Any]]) -> None:
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    def append(self, row: dict[str, Any]) -> None:
        step = row.get("step", 0)
        if step <= self.last_step:  # a restart repeats steps: keep each step once, the newest
            self._write([r for r in read_rows(self.path) if r.get("step", 0) < step])
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        self.last_step = step
        self.gauges.record(row)

    def ready(self) -> bool:
        return True


def start_run_log(out: Path, stage: str, run: str):
    """A :class:`RunLog` actor for ``out/metrics.jsonl``, pinned to this (the driver's) node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    log = ray.remote(RunLog).options(num_cpus=0, scheduling_strategy=here, max_restarts=-1).remote(
        str(out / METRICS_FILE), stage, run)
    ray.get(log.ready.remote())
    return log
