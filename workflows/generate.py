"""`cai generate`: SL-CAI data, critique/revision chains fanned out over vLLM actors.

Reads top to bottom: config → check the model and constitution → describe the run (what
identifies it, which worker does the work) → hand it to the shared sharded-stage runner
(manifest, input shards, Ray placement, actor pool, writing, row accounting).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from actors.engine import EngineOptions
from actors.generation_worker import ChainSettings, GenerationWorker
from constitutions.loader import load_constitution
from core.config import REQUIRED, ConfigError, config_to_dict, identity, option, require_valid
from core.prompt_data import PROMPTS_HELP, PromptOptions, prompt_fingerprint
from core.shards import MESSAGE
from core.cluster_options import ClusterOptions
from actors.engine_config import EngineConfig
from workflows.runtime.model_preflight import prepare_model
from workflows.runtime.models import resolve_model
from workflows.runtime.stage_runner import PoolConfig, StageJob, run_stage

REVISION = pa.struct(
    [("round", pa.int64()), ("principle_id", pa.string()), ("critique", pa.string()), ("revision", pa.string())]
)
OUTPUT_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("id", pa.string()),
        ("prompt", pa.list_(MESSAGE)),
        ("initial_response", pa.string()),
        ("revisions", pa.list_(REVISION)),
        ("final_response", pa.string()),
        ("messages", pa.list_(MESSAGE)),
        ("completion", pa.list_(MESSAGE)),
        ("chosen", pa.list_(MESSAGE)),
        ("rejected", pa.list_(MESSAGE)),
        ("principle_ids", pa.list_(pa.string())),
        ("model", pa.string()),
        ("constitution_sha256", pa.string()),
        ("seed", pa.int64()),
        ("prompt_tokens", pa.int64()),
        ("generated_tokens", pa.int64()),
        ("error", pa.string()),
    ]
)


@dataclass(frozen=True)
class GenerateConfig:
    model: str = option(REQUIRED, "policy model: a local directory, a hub id, or 'default'")
    constitution: str = option(REQUIRED, "constitution YAML file, or a bundled name such as 'harmless'")
    prompts: str = option(REQUIRED, PROMPTS_HELP)
    prompt_source: PromptOptions = option(PromptOptions(), "which split and column of --prompts are read")
    out: str = option(REQUIRED, "run directory; rerunning into it resumes")
    chain: ChainSettings = option(ChainSettings(), "the critique/revision chain of each prompt")
    pool: PoolConfig = option(PoolConfig(), "how the work fans out over Ray actors")
    engine: EngineConfig = option(EngineConfig(), "the vLLM engine in each worker")
    cluster: ClusterOptions = option(ClusterOptions(), "run id, placement waiting and model staging on a shared cluster")

    def __post_init__(self) -> None:
        require_valid(self.chain.problems(), self.pool.problems(), self.engine.problems(), self.cluster.problems())
        if self.pool.gpus_per_worker and self.pool.gpus_per_worker < self.engine.tensor_parallel:
            raise ConfigError("--gpus-per-worker must be at least --tensor-parallel")


def run_generate(config: GenerateConfig) -> dict[str, Any]:
    model_path = resolve_model(config.model)
    constitution = load_constitution(config.constitution)
    chain = config.chain
    if chain.revisions and not constitution.critiques:
        raise ConfigError(f"--constitution {config.constitution!r} has no critique principles")
    if chain.few_shot > len(constitution.few_shot):
        raise ConfigError(f"--few-shot {chain.few_shot}: the constitution has {len(constitution.few_shot)} examples")
    source = prepare_model(model_path, config.model, config.cluster)
    job = StageJob(
        stage="generate",
        out=Path(config.out).expanduser(),
        prompts=config.prompts,
        prompt_source=config.prompt_source,
        pool=config.pool,
        identity=identity(config, model=model_path, constitution_sha256=constitution.sha256,
                          prompts=prompt_fingerprint(config.prompts)),
        config=config_to_dict(config),
        output_schema=OUTPUT_SCHEMA,
        worker_cls=GenerationWorker,
        worker_args=(EngineOptions(model_path, config.engine, seed=chain.seed, model_source=source), constitution.to_dict(), chain),
        worker_kwargs={"model_name": config.model},
        max_num_seqs=config.engine.max_num_seqs, tensor_parallel=config.engine.tensor_parallel,
        cluster=config.cluster,
        models=(source,),
    )
    return run_stage(job)
