"""The engine arguments a host hands to vLLM: first pure (no vLLM, no GPU), then, marked slow,
what the installed vLLM resolves from them inside a real placement group.

Tensor parallel > 1 must name vLLM's multiprocessing executor: left to its default, vLLM picks
its Ray executor inside a placement group and refuses our one-bundle-per-engine reservation.
A label worker with two models starts two engines on one GPU: each must ask for half the share.
"""

from __future__ import annotations

import pytest

from actors import label_worker
from actors.engine import EngineOptions, engine_args, engine_environment
from actors.engine_config import EngineConfig
from actors.label_worker import LabelSettings, LabelWorker
from constitutions.loader import load_constitution
from core.config import ConfigError
from workflows.label import LabelConfig, worker_engines


def tp_engine(tp: int, **own) -> EngineOptions:
    return EngineOptions(model="m", config=EngineConfig(tensor_parallel=tp), **own)


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_engines_use_the_multiprocessing_executor(tp):
    args = engine_args(tp_engine(tp), dtype="bfloat16")
    assert args["distributed_executor_backend"] == "mp"
    assert args["tensor_parallel_size"] == tp


def test_single_gpu_engines_leave_the_executor_to_vllm():
    args = engine_args(EngineOptions(model="m"), dtype="bfloat16")
    assert args["tensor_parallel_size"] == 1
    # unset means vLLM's single-process "uni" executor: no worker processes of its own
    assert "distributed_executor_backend" not in args


def test_cpu_engines_at_tp_1_run_the_model_inside_the_engine_core():
    env = engine_environment(EngineOptions(model="m", cpu_kv_cache_gib=2), cpu=True)
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_LOGGING_LEVEL": "WARNING",
                   "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    # tensor parallel keeps a process per rank; GPUs keep vLLM's own layout
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in engine_environment(
        tp_engine(2), cpu=True)
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in engine_environment(EngineOptions(model="m"), cpu=False)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fields_pass_through_unchanged(tp):
    config = EngineConfig(max_model_len=1024, dtype="auto", tensor_parallel=tp, trust_remote_code=True,
                          enforce_eager=True, max_num_seqs=8)
    options = EngineOptions(model="/models/tiny", config=config, seed=7, worker_extension_cls="pkg.Ext")
    args = engine_args(options, dtype="float32")
    assert args["model"] == "/models/tiny"
    assert args["seed"] == 7
    assert args["dtype"] == "float32"  # the resolved dtype, not the option's "auto"
    assert args["trust_remote_code"] is True
    assert args["max_model_len"] == 1024
    assert args["tensor_parallel_size"] == tp
    assert args["enforce_eager"] is True and args["max_num_seqs"] == 8
    assert args["worker_extension_cls"] == "pkg.Ext"
    assert args["disable_log_stats"] is True


def test_max_model_len_0_leaves_the_context_to_the_model():
    assert engine_args(EngineOptions(model="m"), dtype="float32")["max_model_len"] is None


def test_an_engine_shares_its_gpus_with_at_least_itself():
    with pytest.raises(ValueError, match="engines_per_worker"):
        EngineOptions(model="m", engines_per_worker=0)


def test_no_worker_extension_is_an_empty_string():
    assert engine_args(EngineOptions(model="m"), dtype="float32")["worker_extension_cls"] == ""


def test_extra_adds_new_fields():
    options = tp_engine(2, extra={"swap_space": 2, "quantization": "fp8"})
    args = engine_args(options, dtype="bfloat16")
    assert args["swap_space"] == 2 and args["quantization"] == "fp8"
    assert args["distributed_executor_backend"] == "mp"


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("key, value", [("distributed_executor_backend", "ray"),
                                        ("pipeline_parallel_size", 2), ("data_parallel_size", 2)])
def test_extra_cannot_change_the_executor_or_the_gpu_count(tp, key, value):
    options = tp_engine(tp, extra={key: value})
    with pytest.raises(ValueError, match=f"EngineOptions.extra sets \\['{key}'\\]"):
        engine_args(options, dtype="bfloat16")


@pytest.mark.parametrize("key", ["tensor_parallel_size", "seed", "dtype", "model"])
def test_extra_cannot_override_a_field(key):
    with pytest.raises(ValueError, match=key):
        engine_args(EngineOptions(model="m", extra={key: 2}), dtype="float32")


# --- a label worker's two engines on one GPU ---------------------------------------------


def label_config(**engine) -> LabelConfig:
    return LabelConfig(policy="sft", constitution="harmless", prompts="p.jsonl", out="out",
                       engine=EngineConfig(**engine))


@pytest.mark.parametrize("configured", [0.85, 0.6])
def test_a_label_worker_with_two_models_gives_each_engine_half_the_gpu_share(configured):
    """vLLM checks at start that the GPU's free memory covers an engine's whole share
    (vllm/v1/worker/utils.py, request_memory): two engines asking for 0.85 each cannot both start."""
    policy, feedback = worker_engines(label_config(gpu_memory_utilization=configured), "/m/sft", None, "/m/base", None)
    assert (policy.model, feedback.model) == ("/m/sft", "/m/base")
    shares = [engine_args(options, dtype="bfloat16")["gpu_memory_utilization"] for options in (policy, feedback)]
    assert shares == [configured / 2, configured / 2]
    assert sum(shares) == pytest.approx(configured)


def test_a_label_worker_with_one_model_starts_one_engine_with_the_whole_share():
    policy, feedback = worker_engines(label_config(), "/m/sft", None, "/m/sft", None)
    assert feedback is None
    assert engine_args(policy, dtype="bfloat16")["gpu_memory_utilization"] == 0.85
    # every other stage's single engine keeps the whole share too
    assert EngineOptions("m", EngineConfig(gpu_memory_utilization=0.7)).gpu_memory_share == 0.7


def test_the_label_worker_shares_its_policy_engine_when_there_are_no_feedback_options(monkeypatch):
    started = []

    class FakeHost:  # stands in for VLLMEngineHost: records the options each engine would start with
        def __init__(self, options):
            self.options = options
            started.append(options)

    monkeypatch.setattr(label_worker, "VLLMEngineHost", FakeHost)
    constitution = load_constitution("harmless").to_dict()
    one = LabelWorker(*worker_engines(label_config(), "/m/sft", None, "/m/sft", None), constitution, LabelSettings())
    assert one.scorer.host is one.policy and len(started) == 1
    started.clear()
    two = LabelWorker(*worker_engines(label_config(), "/m/sft", None, "/m/base", None), constitution, LabelSettings())
    assert two.scorer.host is not two.policy
    assert [(o.model, o.gpu_memory_share) for o in started] == [("/m/sft", 0.425), ("/m/base", 0.425)]


@pytest.mark.parametrize("value", [0.0, 1.5])
def test_gpu_memory_utilization_must_be_a_share(value):
    with pytest.raises(ConfigError, match="--gpu-memory-utilization"):
        label_config(gpu_memory_utilization=value)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_every_key_is_an_engine_argument_of_the_installed_vllm(tp):
    pytest.importorskip("vllm")
    from dataclasses import fields

    from vllm import AsyncEngineArgs

    args = engine_args(tp_engine(tp), dtype="float32")
    assert set(args) <= {f.name for f in fields(AsyncEngineArgs)}


# --- the installed vLLM, inside a real placement group ------------------------------------


@pytest.fixture(scope="module")
def resolved_in_placement_group(ray_local, tiny_model) -> dict:
    """What vLLM resolves where an engine actor runs: in a placement-group bundle that captures
    child tasks, as ``workflows.runtime.placement.bundle_options`` places it."""
    pytest.importorskip("vllm")
    import ray

    from workflows.runtime.placement import WorkerResources, bundle_options, release, reserve_workers

    class EngineConfigProbe:  # local, so Ray ships it by value to the worker
        def resolve(self, model: str) -> dict:
            import os

            from vllm import AsyncEngineArgs
            from vllm.utils.system_utils import get_mp_context

            def backend(args: dict) -> str:
                return AsyncEngineArgs(**args).create_engine_config().parallel_config.distributed_executor_backend

            # first, as on a GPU: vLLM's CPU platform sets spawn itself while it builds a config
            found = {
                "start_method": get_mp_context().get_start_method(),
                "ray_address": os.environ.get("RAY_ADDRESS"),
                "gcs_address": ray.get_runtime_context().gcs_address,
            }
            found["in_placement_group"] = ray.util.get_current_placement_group() is not None
            for tp in (1, 2):
                ours = engine_args(EngineOptions(model=model, config=EngineConfig(tensor_parallel=tp)), dtype="float32")
                found[f"tp{tp}"] = backend(ours)
                found[f"tp{tp}_vllm_default"] = backend({k: v for k, v in ours.items()
                                                         if k != "distributed_executor_backend"})
            return found

    resources = WorkerResources(cpus=1)
    pg = reserve_workers(1, resources, timeout_s=60, name="engine-args-probe")
    try:
        probe = ray.remote(EngineConfigProbe).options(**bundle_options(pg, 0, resources)).remote()
        return ray.get(probe.resolve.remote(tiny_model), timeout=300)
    finally:
        release(pg)  # also ends the probe


@pytest.mark.slow
def test_inside_a_placement_group_tensor_parallel_resolves_to_mp_not_ray(resolved_in_placement_group):
    found = resolved_in_placement_group
    assert found["in_placement_group"]
    assert found["tp2_vllm_default"] == "ray", "the problem engine_args works around (issue 11)"
    assert found["tp2"] == "mp"
    # TP 1: vLLM's own choice, never Ray ("uni"; the CPU build turns it into a one-worker "mp")
    assert found["tp1"] == found["tp1_vllm_default"] != "ray"


@pytest.mark.slow
def test_vllm_spawns_its_workers_inside_a_ray_actor(resolved_in_placement_group):
    """Why the host sets no VLLM_WORKER_MULTIPROC_METHOD: vLLM picks spawn itself in an actor."""
    found = resolved_in_placement_group
    assert found["start_method"] == "spawn"
    assert found["ray_address"] == found["gcs_address"], "vLLM exports the cluster address to its workers"
