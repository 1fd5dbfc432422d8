"""`cai label`: RL-CAI preference data, AI feedback under constitutional principles.

Reads top to bottom: config → check the models and constitution → describe the run →
hand it to the shared sharded-stage runner (manifest, input shards, Ray placement, actor
pool, writing, row accounting). One output row per compared pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from actors.engine import EngineOptions
from actors.label_worker import LabelSettings, LabelWorker
from constitutions.loader import load_constitution
from core.config import REQUIRED, ConfigError, config_to_dict, identity, option, require_valid
from core.prompt_data import PROMPTS_HELP, PromptOptions, prompt_fingerprint
from core.shards import MESSAGE
from core.cluster_options import ClusterOptions
from actors.engine_config import EngineConfig
from workflows.runtime.model_preflight import prepare_model
from workflows.runtime.models import resolve_model
from workflows.runtime.stage_runner import PoolConfig, StageJob, run_stage

OUTPUT_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("id", pa.string()),
        ("prompt_id", pa.string()),
        ("prompt", pa.list_(MESSAGE)),
        ("chosen", pa.list_(MESSAGE)),
        ("rejected", pa.list_(MESSAGE)),
        ("chosen_prob", pa.float64()),
        ("response_a", pa.string()),
        ("response_b", pa.string()),
        ("sample_indices", pa.list_(pa.int64())),
        ("prob_a", pa.float64()),
        ("principle_ids", pa.list_(pa.string())),
        ("principle_probs", pa.list_(pa.float64())),
        ("option_orders", pa.list_(pa.list_(pa.int64()))),
        ("order_prob_a", pa.list_(pa.float64())),
        ("order_fallbacks", pa.list_(pa.bool_())),
        ("reasoning", pa.list_(pa.string())),
        ("identical", pa.bool_()),
        ("cot", pa.bool_()),
        ("scoring_fallbacks", pa.int64()),
        ("policy_model", pa.string()),
        ("feedback_model", pa.string()),
        ("constitution_sha256", pa.string()),
        ("seed", pa.int64()),
        ("generated_tokens", pa.int64()),
    ]
)


@dataclass(frozen=True)
class LabelConfig:
    policy: str = option(REQUIRED, "policy model that samples the answers (typically the SL-CAI model)")
    feedback_model: str = option("", "model that compares answers; default: the policy")
    constitution: str = option(REQUIRED, "constitution YAML file, or a bundled name such as 'harmless'")
    prompts: str = option(REQUIRED, PROMPTS_HELP)
    prompt_source: PromptOptions = option(PromptOptions(), "which split and column of --prompts are read")
    out: str = option(REQUIRED, "run directory; rerunning into it resumes")
    labelling: LabelSettings = option(LabelSettings(), "how each prompt's answers are sampled and compared")
    pool: PoolConfig = option(PoolConfig(), "how the work fans out over Ray actors")
    engine: EngineConfig = option(EngineConfig(), "the vLLM engines in each worker")
    cluster: ClusterOptions = option(ClusterOptions(), "run id, placement waiting and model staging on a shared cluster")

    def __post_init__(self) -> None:
        require_valid(self.labelling.problems(), self.pool.problems(), self.engine.problems(), self.cluster.problems())


def run_label(config: LabelConfig) -> dict[str, Any]:
    policy = resolve_model(config.policy)
    feedback = resolve_model(config.feedback_model) if config.feedback_model else policy
    constitution = load_constitution(config.constitution)
    if not constitution.feedback:
        raise ConfigError(f"--constitution {config.constitution!r} has no feedback principles; cai label needs them")
    settings = config.labelling
    policy_source = prepare_model(policy, config.policy, config.cluster)
    feedback_source = prepare_model(feedback, config.feedback_model, config.cluster) if feedback != policy else None
    policy_options, feedback_options = worker_engines(config, policy, policy_source, feedback, feedback_source)
    job = StageJob(
        stage="label",
        out=Path(config.out).expanduser(),
        prompts=config.prompts,
        prompt_source=config.prompt_source,
        pool=config.pool,
        identity=identity(config, policy=policy, feedback_model=feedback, constitution_sha256=constitution.sha256,
                          prompts=prompt_fingerprint(config.prompts)),
        config=config_to_dict(config),
        output_schema=OUTPUT_SCHEMA,
        worker_cls=LabelWorker,
        worker_args=(policy_options, feedback_options, constitution.to_dict(), settings),
        worker_kwargs={"policy_name": config.policy, "feedback_name": config.feedback_model or config.policy},
        max_num_seqs=config.engine.max_num_seqs, tensor_parallel=config.engine.tensor_parallel,
        many_per_input=True,
        cluster=config.cluster,
        models=tuple(s for s in (policy_source, feedback_source) if s is not None),
    )
    summary = run_stage(job)
    summary.update(label_statistics(job.out))
    return summary


def worker_engines(config: LabelConfig, policy: str, policy_source: Any, feedback: str,
                   feedback_source: Any) -> tuple[EngineOptions, EngineOptions | None]:
    """The engines each label worker starts (``policy`` and ``feedback``: resolved paths). One
    model in both roles: one engine, which the worker uses for both (feedback options None).
    Another feedback model: its own engine on the same GPUs, and the two split
    ``--gpu-memory-utilization`` in halves (``EngineOptions.gpu_memory_share``); each asking for the
    whole share, vLLM would refuse the second for lack of free memory."""
    seed = config.labelling.seed
    if feedback == policy:
        return EngineOptions(policy, config.engine, seed=seed, model_source=policy_source), None
    return (EngineOptions(policy, config.engine, seed=seed, model_source=policy_source, engines_per_worker=2),
            EngineOptions(feedback, config.engine, seed=seed, model_source=feedback_source, engines_per_worker=2))


def label_statistics(out: Path) -> dict[str, Any]:
    """How decided the labels are, how many pairs were identical, how many needed the
    exact-scoring fallback: reported, never hidden."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = sorted((out / "data").glob("*.parquet"))
    if not files:
        return {"pairs": 0}
    table = pa.concat_tables(
        pq.read_table(f, columns=["chosen_prob", "identical", "scoring_fallbacks"]) for f in files
    )
    return {
        "pairs": table.num_rows,
        "mean_chosen_prob": round(pc.mean(table.column("chosen_prob")).as_py(), 4),
        "identical_pairs": pc.sum(table.column("identical")).as_py() or 0,
        "scoring_fallbacks": pc.sum(table.column("scoring_fallbacks")).as_py() or 0,
    }
