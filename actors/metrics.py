"""Ray dashboard metrics for a stage, tagged with the stage and run name.

``ray.util.metrics`` objects are exported through Ray's metrics agent to Prometheus and the
dashboard's Metrics tab (names are prefixed ``ray_``), e.g.
``ray_cai_prompts_completed_total{stage="generate", run="..."}``.
"""

from __future__ import annotations


class StageMetrics:
    def __init__(self, stage: str, run: str):
        from ray.util.metrics import Counter, Gauge, Histogram

        tags = ("stage", "run")
        self._tags = {"stage": stage, "run": run or "-"}
        self._prompts = Counter("cai_prompts_completed", "Rows completed", tag_keys=tags)
        self._tokens = Counter("cai_tokens_generated", "Tokens generated", tag_keys=tags)
        self._pending = Gauge("cai_shards_pending", "Shards not yet done", tag_keys=tags)
        self._seconds = Histogram(
            "cai_shard_seconds", "Seconds per shard", boundaries=[1, 5, 15, 60, 300, 1200, 3600], tag_keys=tags
        )

    def prompt_done(self, count: int = 1) -> None:
        self._prompts.inc(count, tags=self._tags)

    def tokens(self, count: int) -> None:
        if count:
            self._tokens.inc(count, tags=self._tags)

    def shards_pending(self, count: int) -> None:
        self._pending.set(count, tags=self._tags)

    def shard_seconds(self, seconds: float) -> None:
        self._seconds.observe(seconds, tags=self._tags)
