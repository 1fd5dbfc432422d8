"""The driver's progress bar (rows, rows/s, tokens/s) and its dashboard gauge."""

from __future__ import annotations

import sys
import time


class RunProgress:
    """Counts finished shards; shows rows and throughput on a tqdm bar on stderr."""

    def __init__(self, stage: str, *, total_rows: int, done_rows: int, total_shards: int, done_shards: int,
                 run: str = "", metrics: bool = True):
        from tqdm import tqdm

        self.prefix = f"cai {stage}" + (f" [{run}]" if run else "")
        self.started = time.monotonic()
        self.tokens = 0
        self.rows = 0
        self.total_shards = total_shards
        self.done_shards = done_shards
        self.workers_up: int | None = None  # the pool's workers up, once it has started
        self.bar = tqdm(total=total_rows, initial=done_rows, unit="row", desc=f"cai {stage}",
                        dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
        self._metrics = None
        if metrics:
            from actors.metrics import StageMetrics

            self._metrics = StageMetrics(stage, run)
        self._update()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _update(self) -> None:
        elapsed = max(self.elapsed, 1e-9)
        workers = "" if self.workers_up is None else f"{self.workers_up} worker(s), "
        self.bar.set_postfix_str(
            f"{workers}shards {self.done_shards}/{self.total_shards}, {self.rows / elapsed:.2f} rows/s, "
            f"{self.tokens / elapsed:.1f} tok/s",
            refresh=False,
        )
        if self._metrics is not None:
            try:
                self._metrics.shards_pending(self.total_shards - self.done_shards)
                if self.workers_up is not None:
                    self._metrics.workers_up(self.workers_up)
            except Exception:  # noqa: BLE001 - no Ray metrics agent (e.g. Ray not started): the bar still works
                self._metrics = None

    def shard_done(self, rows: int, tokens: int) -> None:
        self.done_shards += 1
        self.rows += rows
        self.tokens += tokens
        self.bar.update(rows)
        self._update()

    def workers(self, up: int) -> None:
        """The pool's workers up now: shown on the bar and set on the ``cai_workers_up`` gauge."""
        self.workers_up = up
        self._update()

    def note(self, message: str) -> None:
        self.bar.write(f"{self.prefix}: {message}", file=sys.stderr)  # stdout keeps the JSON summary

    def close(self) -> None:
        self._update()
        self.bar.close()
