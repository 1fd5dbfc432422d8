"""Every Ray metric ray-cai emits, declared once in :data:`METRICS`, and the objects that set them.

``ray.util.metrics`` objects are exported through each node's metrics agent to Prometheus and
the dashboard's Metrics tab. Ray prefixes each name with ``ray_``; Prometheus adds ``_total``
to counters and ``_bucket``/``_sum``/``_count`` to histograms, e.g.
``ray_cai_prompts_completed_total{stage="generate", run="sl-cai-3f2a1b"}``. Every metric is
tagged with ``stage`` (generate, label, compare-answers, ppo, sft, ...) and ``run`` (the run
id), so two pipelines on one cluster never mix. The Grafana dashboard in ``cluster/grafana/``
queries only the names :func:`exported_names` lists (a test checks it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

TAGS = ("stage", "run")


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Literal["counter", "gauge", "histogram"]
    description: str
    tags: tuple[str, ...] = TAGS
    boundaries: tuple[float, ...] = ()

    def exported(self) -> tuple[str, ...]:
        """The series names Prometheus shows for this metric."""
        base = f"ray_{self.name}"
        if self.kind == "counter":
            return (f"{base}_total",)
        if self.kind == "histogram":
            return (f"{base}_bucket", f"{base}_sum", f"{base}_count")
        return (base,)


PPO_PHASES = ("rollout", "scoring", "training", "sync")

METRICS: tuple[MetricSpec, ...] = (
    # sharded stages: generate, label, eval compare (answers, judge), eval feedback
    MetricSpec("cai_prompts_completed", "counter", "Rows completed"),
    MetricSpec("cai_tokens_generated", "counter", "Tokens generated"),
    MetricSpec("cai_shards_pending", "gauge", "Shards not yet done"),
    MetricSpec("cai_workers_up", "gauge", "Workers (one engine each) up and taking shards"),
    MetricSpec("cai_shard_seconds", "histogram", "Seconds per shard", boundaries=(1, 5, 15, 60, 300, 1200, 3600)),
    MetricSpec("cai_engine_running_requests", "gauge",
               "Requests an actor's engines held, averaged over its last shard (batch occupancy)"),
    # PPO, one value per step
    MetricSpec("cai_ppo_step", "gauge", "Last finished PPO step"),
    MetricSpec("cai_ppo_reward_mean", "gauge", "Mean reward of the step's rollouts"),
    MetricSpec("cai_ppo_reward_std", "gauge", "Standard deviation of the step's rewards"),
    MetricSpec("cai_ppo_kl", "gauge", "KL(policy || reference) per response, summed over tokens"),
    MetricSpec("cai_ppo_kl_coef", "gauge", "KL coefficient beta"),
    MetricSpec("cai_ppo_response_length", "gauge", "Mean response length in tokens"),
    MetricSpec("cai_ppo_phase_seconds", "gauge", "Seconds of each phase of the step (rollout, scoring, training, sync)",
               tags=(*TAGS, "phase")),
    MetricSpec("cai_ppo_step_seconds", "gauge", "Seconds of the whole step"),
    MetricSpec("cai_ppo_sync_logprob_diff", "gauge",
               "Largest gap between engine and learner log-probs after the weight sync (0 = exact)"),
    MetricSpec("cai_ppo_staleness", "gauge", "Versions between the policy that sampled the step's batch and the one "
               "trained on it (at most --max-staleness)"),
    MetricSpec("cai_ppo_overlap_seconds", "gauge", "Seconds the next batch was sampled while the learners trained"),
    MetricSpec("cai_ppo_is_weight_mean", "gauge", "Mean truncated importance weight min(pi_proximal / pi_behaviour, "
               "--is-cap) over the step's tokens"),
    MetricSpec("cai_ppo_is_clipped_frac", "gauge", "Share of the step's tokens whose importance ratio exceeded --is-cap"),
    MetricSpec("cai_ppo_behaviour_gap", "gauge", "Mean |log pi_proximal - log pi_behaviour| per token"),
    # sft / rm / dpo, at each logging step of the trainer
    MetricSpec("cai_train_step", "gauge", "Optimizer step"),
    MetricSpec("cai_train_epoch", "gauge", "Epoch (fractional)"),
    MetricSpec("cai_train_loss", "gauge", "Training loss"),
    MetricSpec("cai_train_learning_rate", "gauge", "Learning rate"),
    MetricSpec("cai_train_tokens_per_second", "gauge", "Input tokens per second since the previous log"),
)
SPECS = {spec.name: spec for spec in METRICS}


def exported_names() -> set[str]:
    """Every series name Prometheus can show for ray-cai."""
    return {name for spec in METRICS for name in spec.exported()}


def _make(name: str):
    from ray.util.metrics import Counter, Gauge, Histogram

    spec = SPECS[name]
    if spec.kind == "counter":
        return Counter(spec.name, spec.description, tag_keys=spec.tags)
    if spec.kind == "histogram":
        return Histogram(spec.name, spec.description, boundaries=list(spec.boundaries), tag_keys=spec.tags)
    return Gauge(spec.name, spec.description, tag_keys=spec.tags)


class StageMetrics:
    """The metrics of one sharded stage, set from its actors and its driver."""

    def __init__(self, stage: str, run: str):
        self._tags = {"stage": stage, "run": run or "-"}
        self._prompts = _make("cai_prompts_completed")
        self._tokens = _make("cai_tokens_generated")
        self._pending = _make("cai_shards_pending")
        self._workers = _make("cai_workers_up")
        self._seconds = _make("cai_shard_seconds")
        self._running = _make("cai_engine_running_requests")

    def prompt_done(self, count: int = 1) -> None:
        self._prompts.inc(count, tags=self._tags)

    def tokens(self, count: int) -> None:
        if count:
            self._tokens.inc(count, tags=self._tags)

    def shards_pending(self, count: int) -> None:
        self._pending.set(count, tags=self._tags)

    def workers_up(self, count: int) -> None:
        self._workers.set(count, tags=self._tags)

    def shard_seconds(self, seconds: float) -> None:
        self._seconds.observe(seconds, tags=self._tags)

    def running_requests(self, mean: float) -> None:
        self._running.set(mean, tags=self._tags)


class StepGauges:
    """Gauges set from one row of a training run's ``metrics.jsonl`` (PPO or sft/rm/dpo):
    each row key in ``fields`` sets the gauge it names."""

    PPO = {"step": "cai_ppo_step", "reward": "cai_ppo_reward_mean", "reward_std": "cai_ppo_reward_std",
           "kl": "cai_ppo_kl", "kl_coef": "cai_ppo_kl_coef", "response_length": "cai_ppo_response_length",
           "step_seconds": "cai_ppo_step_seconds", "sync_logprob_diff": "cai_ppo_sync_logprob_diff",
           "staleness": "cai_ppo_staleness", "overlap_seconds": "cai_ppo_overlap_seconds",
           "is_weight_mean": "cai_ppo_is_weight_mean", "is_clipped_frac": "cai_ppo_is_clipped_frac",
           "behaviour_gap": "cai_ppo_behaviour_gap"}
    TRAIN = {"step": "cai_train_step", "epoch": "cai_train_epoch", "loss": "cai_train_loss",
             "learning_rate": "cai_train_learning_rate", "tokens_per_second": "cai_train_tokens_per_second"}

    def __init__(self, stage: str, run: str):
        self._tags = {"stage": stage, "run": run or "-"}
        self._fields = self.PPO if stage == "ppo" else self.TRAIN
        self._gauges = {key: _make(name) for key, name in self._fields.items()}
        self._phases = _make("cai_ppo_phase_seconds") if stage == "ppo" else None

    def record(self, row: Mapping[str, Any]) -> None:
        for key, gauge in self._gauges.items():
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                gauge.set(float(value), tags=self._tags)
        if self._phases is not None:
            for phase in PPO_PHASES:
                value = row.get(f"{phase}_seconds")
                if isinstance(value, (int, float)):
                    self._phases.set(float(value), tags={**self._tags, "phase": phase})
