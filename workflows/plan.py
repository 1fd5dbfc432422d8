"""`cai plan`: per stage and per device, the memory a pipeline config needs, and whether it fits.

Reads top to bottom: the pipeline's stages with their full configs (``workflows.pipeline.plan``)
→ the shape of every model they use → each stage's devices (learners, frozen-model actors,
vLLM engines) and their terms (:mod:`core.memory_plan`) → a table, and a refusal naming
every stage that cannot fit and its largest term. ``cai run`` runs the same check first
(:func:`check_run_memory`). The formulas and their assumptions: ``docs/memory.md``.

Devices: a GPU stage (``use_gpu``, or engines with ``gpus_per_worker`` > 0) is checked against
``--gpu-memory-gib`` per GPU: a number, or ``auto``, the smallest GPU of the cluster's GPU nodes
(:mod:`workflows.runtime.devices`, which also decides the GPU options a config leaves unset: GPUs
when the cluster has them, or when a number is given). A CPU stage's process is checked against
``--cpu-memory-gib``, by default the memory of the machine running the plan (processes sharing a
node are not added up).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from actors.engine import EngineOptions
from core.memory_plan import (GIB, MemoryPlanError, ModelShape, StagePlan, TrainedModel, check_fits, dtype_bytes,
                              engine_terms, kv_bytes_per_token, known_shape, learner_terms, logits_bytes, read_shape,
                              sync_bytes)
from core.config import ConfigError
from workflows.runtime.devices import GPU_MEMORY_HELP, GpuBudget, GpuMemory, gpu_budget, gpu_memory_setting, on_devices

DEFAULT_PROMPT_TOKENS = 512
TERMS = ("weights", "gradients", "optimizer", "unsharded block", "frozen models", "activations", "logits", "weight sync",
         "kv cache")
HEADERS = ("weights", "grads", "optim", "block", "frozen", "activ", "logits", "sync", "kv")
PRODUCED = {"sft": False, "rm": True, "ppo": False, "dpo": False}  # stage -> its model has a score head


def machine_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def shape_finder(base_model: str, stages: list[Any]) -> Callable[[str], ModelShape]:
    """``spec -> ModelShape`` for every model a stage may name. A model the pipeline trains
    (``OUT/sft``, ``OUT/rm``, ...) does not exist yet: it has the base model's shape (the RM's
    with a one-output head). Hub ids: :data:`core.memory_plan.KNOWN_MODELS`, else a
    ``config.json`` already in the local Hugging Face cache; nothing is downloaded."""
    from workflows.runtime.models import is_hub_id

    def key(spec: str) -> str:
        return spec if spec == "default" or is_hub_id(spec) else str(Path(spec).expanduser().resolve())

    produced = {key(str(stage.out)): PRODUCED[stage.name] for stage in stages if stage.name in PRODUCED}
    found: dict[str, ModelShape] = {}

    def shape_of(spec: str) -> ModelShape:
        if key(spec) in produced:
            base = shape_of(base_model)
            return base.as_score_model() if produced[key(spec)] else base
        if spec not in found:
            found[spec] = _read(spec, is_hub_id(spec))
        return found[spec]

    return shape_of


def _read(spec: str, hub: bool) -> ModelShape:
    if not hub:
        from workflows.runtime.models import resolve_model

        return read_shape(resolve_model(spec))  # 'default' or a directory (a clear error when it is missing)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec, "config.json")
    return read_shape(Path(cached).parent) if isinstance(cached, str) else known_shape(spec)


# -- devices of each stage -------------------------------------------------------------------


def _engine_dtype_bytes(engine, shape: ModelShape, gpu: bool) -> int:
    """``--dtype auto``: the checkpoint's own dtype on GPU, float32 on CPU (actors.engine.resolve_dtype)."""
    if engine.dtype == "auto":
        return dtype_bytes(shape.dtype) if gpu else 4
    return dtype_bytes(engine.dtype)


def engine_plan(stage: str, device: str, engine, shape: ModelShape, *, gpu: bool, count: int,
                engines_per_worker: int = 1) -> StagePlan:
    """One vLLM engine of each worker, checked against its part of the GPU: the
    ``EngineOptions.gpu_memory_share`` it has when ``engines_per_worker`` engines share the
    worker's GPUs (what the workers themselves start with)."""
    options = EngineOptions("plan", engine, engines_per_worker=engines_per_worker)
    terms = engine_terms(shape, gpu=gpu, dtype_bytes=_engine_dtype_bytes(engine, shape, gpu),
                         tensor_parallel=engine.tensor_parallel,
                         max_model_len=engine.max_model_len or shape.max_position_embeddings,
                         cpu_kv_cache_gib=options.cpu_kv_cache_gib)
    if engine.tensor_parallel > 1:
        device += f" tp{engine.tensor_parallel}"
    return StagePlan(stage, device, gpu, count, terms, options.gpu_memory_share if gpu else 1.0)


def label_plans(cfg, shape_of: Callable[[str], ModelShape]) -> list[StagePlan]:
    """The policy's engine and, when the feedback model is another model, its engine on the same
    GPUs (``workflows.label.worker_engines``): each then has half of the GPU share."""
    gpu, count = bool(cfg.pool.gpus_per_worker), cfg.pool.workers
    models = list(dict.fromkeys([cfg.policy, cfg.feedback_model or cfg.policy]))
    if len(models) == 1:
        return [engine_plan("label", "engine", cfg.engine, shape_of(cfg.policy), gpu=gpu, count=count)]
    policy, feedback = (engine_plan("label", f"{role} engine", cfg.engine, shape_of(model), gpu=gpu, count=count,
                                    engines_per_worker=2) for role, model in zip(("policy", "feedback"), models))
    if gpu:
        policy = replace(policy, notes=(f"the policy and feedback engines share each worker's GPUs: "
                                        f"gpu_memory_utilization {policy.usable_fraction:g} each",))
    return [policy, feedback]


def learner_plan(stage: str, cfg, trained: list[TrainedModel], *, sequences: int, frozen=()) -> StagePlan:
    """An HF/TRL job's learners: ``sequences`` rows of ``max_length`` tokens per forward. A
    frozen reference (DPO's) is TRL's under DDP, a whole copy in the masters' dtype; under FSDP
    it is sharded like the policy and stored in the compute dtype (learners/hf_sharding.py)."""
    gpu, workers = bool(cfg.learner.use_gpu), cfg.training.workers
    compute, master = precision_bytes(cfg.learner)
    fsdp = cfg.learner.strategy == "fsdp"
    shards = workers if fsdp else 1
    terms = learner_terms(trained, gpu=gpu, shards=shards, frozen=list(frozen),
                          frozen_dtype_bytes=compute if fsdp else master, frozen_shards=shards, sequences=sequences,
                          seq_len=cfg.training.max_length, checkpointing=cfg.learner.gradient_checkpointing,
                          compute_bytes=compute, master_bytes=master)
    return StagePlan(stage, f"{cfg.learner.strategy} learner", gpu, workers, terms)


def precision_bytes(learner) -> tuple[int, int]:
    """Bytes per parameter of the learners' forward and of their masters (core.precision)."""
    from core.precision import compute_dtype_name

    return dtype_bytes(compute_dtype_name(learner.compute_dtype, learner.use_gpu)), dtype_bytes(learner.master_dtype)


def _trained(shape: ModelShape, lora) -> TrainedModel:
    return TrainedModel(shape, lora.lora_r, tuple(lora.lora_targets))


def ppo_plans(cfg, shape_of: Callable[[str], ModelShape], prompt_tokens: int) -> list[StagePlan]:
    """Learners (policy and value trained; reference and reward frozen unless ``--frozen-on actors``),
    the frozen-model actors, and the rollout engines. Sequences: ``prompt_tokens`` + max_new_tokens.
    The learners' largest forward scores their whole share of the rollout batch at once."""
    gpu = bool(cfg.learner.use_gpu)
    policy = shape_of(cfg.policy)
    reward = shape_of(cfg.reward_model).as_score_model() if cfg.reward_model else None
    value = shape_of(cfg.value_model) if cfg.value_model else (reward or policy)
    frozen = [shape_of(cfg.ref_model) if cfg.ref_model else policy] + ([reward] if reward else [])
    frozen_bytes = (2 if gpu else 4) if cfg.frozen_dtype == "auto" else dtype_bytes(cfg.frozen_dtype)
    seq_len, share = prompt_tokens + cfg.sampling.max_new_tokens, cfg.rollout_batch // cfg.learners
    on_learners = cfg.frozen_on == "learners"
    terms = learner_terms([_trained(policy, cfg.lora), TrainedModel(value.as_score_model())], gpu=gpu,
                          shards=cfg.learners if cfg.learner.strategy == "fsdp" else 1,
                          frozen=frozen if on_learners else [], frozen_dtype_bytes=frozen_bytes,
                          sequences=cfg.minibatch, seq_len=seq_len, logits_sequences=share,
                          checkpointing=cfg.learner.gradient_checkpointing,
                          **dict(zip(("compute_bytes", "master_bytes"), precision_bytes(cfg.learner))))
    # learner rank 0 during a weight sync (the other ranks under FSDP: the gathered bucket only)
    terms["weight sync"] = sync_bytes(policy, bucket_bytes=cfg.sync.sync_bucket_mb << 20, gpu=gpu,
                                      sharded=cfg.learner.strategy == "fsdp" and cfg.learners > 1,
                                      transport=cfg.sync.transport(gpu))
    plans = [StagePlan("ppo", f"{cfg.learner.strategy} learner", gpu, cfg.learners, terms)]
    if not on_learners:
        widest = max(frozen, key=lambda s: s.output_size)
        plans.append(StagePlan("ppo", "frozen actor", gpu, cfg.learners, {
            "frozen models": sum(s.params for s in frozen) * frozen_bytes,
            "logits": logits_bytes(widest, sequences=share, seq_len=seq_len)}))
    plans.append(engine_plan("ppo", "rollout engine", cfg.engine, policy, gpu=gpu, count=cfg.rollout_workers))
    return plans


def stage_plans(stage, shape_of: Callable[[str], ModelShape], prompt_tokens: int) -> list[StagePlan]:
    """The devices of one pipeline stage (``workflows.pipeline.Stage``) and what each holds."""
    cfg, name = stage.config, stage.name
    if name == "label":
        return label_plans(cfg, shape_of)
    if name in ("generate", "eval"):
        if name == "generate":
            shape = shape_of(cfg.model)
        else:  # eval compare runs one model's engine at a time: the largest decides
            shape = max((shape_of(m) for m in (cfg.model_a, *cfg.model_b, cfg.judge)), key=lambda s: s.params)
        gpu = bool(cfg.pool.gpus_per_worker)
        return [engine_plan(name, "engine", cfg.engine, shape, gpu=gpu, count=cfg.pool.workers)]
    if name == "ppo":
        return ppo_plans(cfg, shape_of, prompt_tokens)
    batch = cfg.training.batch_size
    if name == "sft":
        return [learner_plan(name, cfg, [_trained(shape_of(cfg.model), cfg.lora)], sequences=batch)]
    if name == "rm":  # chosen and rejected go through the model in one batch
        return [learner_plan(name, cfg, [TrainedModel(shape_of(cfg.model).as_score_model())], sequences=2 * batch)]
    if name == "dpo":  # chosen + rejected; the reference is a frozen copy, or the base under the adapters
        policy = shape_of(cfg.model)
        return [learner_plan(name, cfg, [_trained(policy, cfg.lora)], sequences=2 * batch,
                             frozen=() if cfg.lora.enabled else (policy,))]
    raise MemoryPlanError(f"stage {name!r}: the plan does not know it")


def memory_plan(base_model: str, stages: list[Any], prompt_tokens: int = DEFAULT_PROMPT_TOKENS) -> list[StagePlan]:
    shape_of = shape_finder(base_model, stages)
    return [plan for stage in stages for plan in stage_plans(stage, shape_of, prompt_tokens)]


# -- report ---------------------------------------------------------------------------------


def on_cluster(stages: list[Any], budget: GpuBudget) -> list[Any]:
    """The stages with the GPU options they leave unset decided as they will be on the cluster:
    GPUs when it has GPUs (or a GPU size was given)."""
    return [replace(stage, config=on_devices(stage.config, budget.gib is not None)) for stage in stages]


def gpu_stages(plans: list[StagePlan]) -> list[str]:
    return list(dict.fromkeys(plan.stage for plan in plans if plan.gpu))


def plan_report(plans: list[StagePlan], gpu_bytes: int, cpu_bytes: int, gpu_from: str = "") -> dict[str, Any]:
    """The plan as JSON-able data, in GiB."""
    rows = []
    for plan in plans:
        size = gpu_bytes if plan.gpu else cpu_bytes
        rows.append({"stage": plan.stage, "device": plan.device, "kind": "gpu" if plan.gpu else "cpu",
                     "count": plan.count, "terms_gib": {k: round(v / GIB, 2) for k, v in plan.terms.items()},
                     "total_gib": round(plan.total / GIB, 2), "budget_gib": round(plan.budget(size) / GIB, 2),
                     "largest": plan.largest, "fits": plan.fits(size), "notes": list(plan.notes)})
    return {"gpu_memory_gib": round(gpu_bytes / GIB, 2), "gpu_memory_from": gpu_from,
            "cpu_memory_gib": round(cpu_bytes / GIB, 2), "fits": all(row["fits"] for row in rows), "stages": rows}


def format_plan(report: dict[str, Any]) -> str:
    """One row per stage and kind of device: each term, the total and the budget in GiB."""
    lines = [f"{'stage':<9} {'devices':<24} {'on':<4}" + "".join(f"{h:>8}" for h in (*HEADERS, "total", "budget"))
             + "  fits"]
    for row in report["stages"]:
        devices = f"{row['count'] or 'auto'} x {row['device']}"
        cells = [f"{row['terms_gib'][t]:.1f}" if t in row["terms_gib"] else "-" for t in TERMS]
        cells += [f"{row['total_gib']:.1f}", f"{row['budget_gib']:.1f}"]
        lines.append(f"{row['stage']:<9} {devices:<24} {row['kind'].upper():<4}" + "".join(f"{c:>8}" for c in cells)
                     + f"  {'yes' if row['fits'] else 'NO'}")
    lines += [f"note ({row['stage']}): {note}" for row in report["stages"] for note in row["notes"]]
    lines.append(f"GiB per device; GPUs of {report['gpu_memory_gib']:g} GiB (engines: vLLM's gpu_memory_utilization "
                 f"share), CPU processes against {report['cpu_memory_gib']:g} GiB (docs/memory.md)")
    if report["gpu_memory_from"]:
        lines.append(f"GPU memory: {report['gpu_memory_from']}")
    return "\n".join(lines)


def plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="pipeline YAML, the file `cai run --config` takes")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for cai run")
    gpu_memory_argument(parser)
    parser.add_argument("--cpu-memory-gib", type=float, default=0.0,
                        help="memory a CPU stage's process may use, in GiB; default: this machine's")
    parser.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS,
                        help=f"prompt length assumed for PPO's sequences, prompt + --max-new-tokens (default "
                        f"{DEFAULT_PROMPT_TOKENS})")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")


def gpu_memory_argument(parser: argparse.ArgumentParser) -> None:
    """``--gpu-memory-gib`` of `cai plan` and `cai run`: over the pipeline config's ``gpu_memory_gib``."""
    parser.add_argument("--gpu-memory-gib", type=_gpu_memory_flag, metavar="auto|GIB",
                        help=GPU_MEMORY_HELP + "; default: the config's gpu_memory_gib (auto)")


def _gpu_memory_flag(text: str) -> GpuMemory:
    try:
        return gpu_memory_setting("auto" if text == "auto" else float(text))
    except (ValueError, ConfigError):
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto or a number of GiB above 0") from None


def print_plan(base_model: str, stages: list[Any], args: argparse.Namespace, gpu_memory: GpuMemory = "auto") -> int:
    """`cai plan`: print the table (or JSON); exit 1 with the refusal when a stage does not fit
    (or asks for GPUs of a cluster that has none)."""
    import json

    budget = gpu_budget(gpu_memory)
    cpu_bytes = int(args.cpu_memory_gib * GIB) or machine_memory_bytes()
    plans = memory_plan(base_model, on_cluster(stages, budget), args.prompt_tokens)
    if budget.bytes is None and gpu_stages(plans):
        print(f"cai plan: {_no_gpu(gpu_stages(plans), budget)}; join a GPU cluster (RAY_ADDRESS) or give --gpu-memory-gib N "
              "to plan for N-GiB GPUs", file=sys.stderr)
        return 1
    report = plan_report(plans, budget.bytes or 0, cpu_bytes, budget.origin)
    print(json.dumps(report, indent=2) if args.json else format_plan(report))
    try:
        check_fits(plans, budget.bytes or 0, cpu_bytes)
    except MemoryPlanError as exc:
        print(f"cai plan: {exc}", file=sys.stderr)
        return 1
    if not args.json:
        print("fits: every stage fits its devices")
    return 0


def _no_gpu(stages: list[str], budget: GpuBudget) -> str:
    return (f"stage{'s' if len(stages) > 1 else ''} {', '.join(f'`{s}`' for s in stages)} ask"
            f"{'' if len(stages) > 1 else 's'} for GPUs, but {budget.origin}")


def check_run_memory(base_model: str, stages: list[Any], log: Callable[[str], None] = print,
                     gpu_memory: GpuMemory = "auto") -> None:
    """`cai run`'s check before any stage starts: raise :class:`MemoryPlanError` naming a stage
    that cannot fit. GPUs of ``gpu_memory`` GiB, or (``auto``) the smallest the cluster's GPU
    nodes report; CPU processes against this machine's memory. A stage whose models cannot be
    sized here (a hub id the plan does not know, not in the local cache), or whose GPUs are not
    up yet (an autoscaler may still add them) or cannot be read, is named and left unchecked:
    `cai plan` reports each as an error."""
    from workflows.runtime.models import ModelNotFoundError

    try:
        budget = gpu_budget(gpu_memory)
    except ConfigError as exc:
        log(f"cai run: memory of the GPU stages not checked: {exc}")
        budget = None
    shape_of = shape_finder(base_model, stages)
    plans = []
    for stage in on_cluster(stages, budget or GpuBudget(0.0, "unread")):
        try:
            plans += stage_plans(stage, shape_of, DEFAULT_PROMPT_TOKENS)
        except (MemoryPlanError, ModelNotFoundError) as exc:
            log(f"cai run: memory of stage {stage.name} not checked: {exc}")
    if budget is None or budget.bytes is None:
        if budget is not None and gpu_stages(plans):
            log(f"cai run: memory not checked: {_no_gpu(gpu_stages(plans), budget)} now (they will wait for GPU "
                "nodes to join)")
        plans = [plan for plan in plans if not plan.gpu]
    check_fits(plans, (budget.bytes if budget else None) or 0, machine_memory_bytes())
