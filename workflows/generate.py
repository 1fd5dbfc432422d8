"""`cai generate`: SL-CAI data, critique/revision chains fanned out over vLLM actors.

Reads top to bottom: config → run directory and manifest → stage inputs into shards →
Ray and worker placement → pool of generation actors pulling shards → write each shard as
it finishes → check that every input row is accounted for → summary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from actors.engine import EngineOptions
from actors.generation_worker import ChainSettings, GenerationWorker
from constitutions.loader import load_constitution
from workflows.config import REQUIRED, ConfigError, config_to_dict, option
from workflows.manifest import RunManifest, ShardState, file_fingerprint
from workflows.models import resolve_model
from workflows.placement import WorkerResources, bundle_options, release, reserve_workers, workers_that_fit
from workflows.progress import RunProgress
from workflows.ray_session import NAMESPACE, connect_ray
from workflows.shard_pool import ShardQueue, run_shard_pool
from workflows.shards import (
    MESSAGE,
    completed_shards,
    plan_shards,
    read_shard_inputs,
    stage_inputs,
    verify_run,
    write_shard_output,
)

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
    prompts: str = option(REQUIRED, "prompt file: JSONL, JSON, Parquet, CSV or a saved dataset directory")
    out: str = option(REQUIRED, "run directory; rerunning into it resumes")
    revisions: int = option(1, "critique/revision rounds per prompt")
    few_shot: int = option(0, "few-shot examples from the constitution to prepend (a shared prefix)")
    max_new_tokens: int = option(256, "token limit for each answer, critique and revision")
    temperature: float = option(0.7, "sampling temperature")
    top_p: float = option(1.0, "nucleus sampling probability")
    seed: int = option(0, "seed for principle sampling (per row id) and the engines")
    shard_size: int = option(64, "prompts per shard: the unit of scheduling, writing and retry")
    workers: int = option(0, "generation actors; 0 = as many as the cluster's resources fit")
    cpus_per_worker: float = option(1.0, "CPUs reserved per worker")
    gpus_per_worker: float = option(0.0, "GPUs reserved per worker (at least --tensor-parallel on GPU nodes)")
    tensor_parallel: int = option(1, "tensor-parallel size of each worker's engine")
    max_model_len: int = option(0, "context length for the engine; 0 = the model's own")
    inflight_shards: int = option(2, "shards in flight per worker, so engines never idle between shards")
    max_attempts: int = option(3, "tries per shard (and actor replacements per worker) before the run fails")
    limit: int = option(0, "use only the first N prompts; 0 = all")
    enforce_eager: bool = option(False, "skip vLLM's torch.compile warm-up (faster start, slower decode)")
    placement_strategy: Literal["SPREAD", "PACK", "STRICT_SPREAD"] = option(
        "SPREAD", "how worker bundles spread over nodes"
    )

    def __post_init__(self) -> None:
        checks = {
            "revisions": self.revisions >= 0,
            "few_shot": self.few_shot >= 0,
            "max_new_tokens": self.max_new_tokens >= 1,
            "temperature": self.temperature >= 0,
            "top_p": 0 < self.top_p <= 1,
            "shard_size": self.shard_size >= 1,
            "workers": self.workers >= 0,
            "tensor_parallel": self.tensor_parallel >= 1,
            "inflight_shards": self.inflight_shards >= 1,
            "max_attempts": self.max_attempts >= 1,
            "limit": self.limit >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"invalid value for {', '.join('--' + b.replace('_', '-') for b in bad)}")
        if self.gpus_per_worker and self.gpus_per_worker < self.tensor_parallel:
            raise ConfigError("--gpus-per-worker must be at least --tensor-parallel")

    def identity(self, model_path: str, constitution_sha: str, prompts_fingerprint: str) -> dict[str, Any]:
        """The settings that change the output; a rerun must match them to resume."""
        return {
            "model": model_path,
            "constitution_sha256": constitution_sha,
            "prompts": prompts_fingerprint,
            **{k: getattr(self, k) for k in
               ("revisions", "few_shot", "max_new_tokens", "temperature", "top_p", "seed", "shard_size", "limit")},
        }


def _run_name(out: Path) -> str:
    return out.resolve().name.replace("_", "-")[:40]


def _worker_count(config: GenerateConfig, resources: WorkerResources, pending: int) -> int:
    fit = workers_that_fit(resources)
    wanted = config.workers or max(fit, 1)
    return max(1, min(wanted, pending))


def run_generate(config: GenerateConfig) -> dict[str, Any]:
    started = time.monotonic()
    out = Path(config.out).expanduser()
    model_path = resolve_model(config.model)
    constitution = load_constitution(config.constitution)
    if config.revisions and not constitution.critiques:
        raise ConfigError(f"--constitution {config.constitution!r} has no critique principles")
    if config.few_shot > len(constitution.few_shot):
        raise ConfigError(f"--few-shot {config.few_shot}: the constitution has {len(constitution.few_shot)} examples")

    identity = config.identity(model_path, constitution.sha256, file_fingerprint(config.prompts))
    manifest = RunManifest.open(out, "generate", identity, config_to_dict(config))
    if not manifest.input:
        staged = stage_inputs(config.prompts, out, config.shard_size, limit=config.limit or None)
        manifest.input = {"source": str(config.prompts), "total_rows": staged.total_rows, "rejected": staged.rejected,
                          "shards": len(staged.shards)}
        manifest.shards = {s.index: ShardState(rows=s.rows) for s in staged.shards}
        manifest.save()
    shard_count = manifest.input["shards"]
    done = completed_shards(out)
    for index in done:
        manifest.shards[index].status = "done"
    pending = [i for i in range(shard_count) if i not in done]

    run_name = _run_name(out)
    resources = WorkerResources(cpus=config.cpus_per_worker, gpus=config.gpus_per_worker)
    cluster = connect_ray() if pending else None
    progress = RunProgress(
        "generate", total_rows=manifest.input["total_rows"],
        done_rows=manifest.input["rejected"] + sum(manifest.shards[i].rows for i in done),
        total_shards=shard_count, done_shards=len(done), run=run_name, metrics=cluster is not None,
    )
    if cluster:
        n_workers = _worker_count(config, resources, len(pending))
        engine = EngineOptions(
            model=model_path, seed=config.seed, tensor_parallel_size=config.tensor_parallel,
            max_model_len=config.max_model_len or None, enforce_eager=config.enforce_eager,
        )
        settings = ChainSettings(config.revisions, config.max_new_tokens, config.temperature, config.top_p,
                                 config.few_shot, config.seed)
        print(f"cai generate: {len(pending)} of {shard_count} shards to do on {n_workers} worker(s); "
              f"Ray {cluster['address']} dashboard {cluster['dashboard_url'] or '-'}")
        pg = reserve_workers(n_workers, resources, strategy=config.placement_strategy, name=f"cai-generate-{run_name}")
        import ray

        worker_cls = ray.remote(GenerationWorker)

        def make_actor(slot: int, generation: int):
            name = f"cai-generate-{run_name}-{slot}" + (f".r{generation}" if generation else "")
            return worker_cls.options(
                name=name, namespace=NAMESPACE, max_restarts=0, **bundle_options(pg, slot, resources)
            ).remote(engine, constitution.to_dict(), settings, run_name=run_name, model_name=config.model)

        def submit(actor, shard: int):
            return actor.run_shard.remote(shard, read_shard_inputs(out, shard))

        def on_result(shard: int, result: dict[str, Any]) -> None:
            write_shard_output(out, shard, result["rows"], result["rejects"], OUTPUT_SCHEMA)
            state = manifest.shards[shard]
            state.status, state.rows_out, state.rejected = "done", len(result["rows"]), len(result["rejects"])
            state.seconds, state.tokens, state.worker = round(result["seconds"], 3), result["tokens"], result["worker"]
            progress.shard_done(state.rows, result["tokens"])
            manifest.save(force=False)

        def on_failure(shard: int, reason: str) -> None:
            state = manifest.shards[shard]
            state.attempts, state.last_error = state.attempts + 1, reason[:500]
            progress.note(f"shard {shard} failed ({reason[:80]}); retrying")

        queue = ShardQueue.of(pending, config.max_attempts)
        try:
            run_shard_pool(make_actor=make_actor, n_workers=n_workers, queue=queue, submit=submit,
                           on_result=on_result, on_failure=on_failure, inflight_per_worker=config.inflight_shards)
        finally:
            for shard, attempts in queue.attempts.items():
                manifest.shards[shard].attempts = max(manifest.shards[shard].attempts, attempts)
            manifest.save()
            release(pg)
    progress.close()

    accounting = verify_run(out, manifest.input["total_rows"], shard_count)
    tokens = sum(s.tokens for s in manifest.shards.values())
    wall = time.monotonic() - started
    manifest.summary = {
        "rows_in": accounting.rows_in, "rows_out": accounting.rows_out, "rejected": accounting.rejected,
        "tokens": tokens, "wall_seconds": round(wall, 2),
        "tokens_per_second": round(progress.tokens / max(progress.elapsed, 1e-9), 2),
    }
    manifest.save()
    return {"out": str(out), **manifest.summary}

