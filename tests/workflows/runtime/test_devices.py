"""GPU-aware defaults and the GPU memory plans check against (workflows/runtime/devices.py).

The pure rules first (no Ray); then, on a real multi-raylet cluster with logical GPUs
(``devices_scenario.py``), the defaults reserving GPUs per engine, ``cai plan`` reading 24 GiB
GPU nodes and refusing ``configs/cluster.yaml`` by stage, and a GPU node whose memory cannot be
read named; and `cai generate` asking GPUs of a local cluster that has none refused by node.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import ConfigError, load_config
from tests.workflows.runtime.cluster_scenario import REPO, run_scenario
from workflows.generate import GenerateConfig
from learners.ppo_config import PPOConfig
from workflows.runtime.devices import GpuNode, gpu_budget, gpu_memory_setting, on_devices, parse_smi_memory
from learners.hf_configs import SFTConfig


def generate(**values) -> GenerateConfig:
    return load_config(GenerateConfig, overrides={"model": "m", "constitution": "harmless", "prompts": "p.jsonl",
                                                  "out": "o", **values})


def test_unset_gpus_per_worker_is_the_tensor_parallel_size_on_gpus_and_0_on_cpus():
    cfg = generate(tensor_parallel=4)
    assert cfg.pool.gpus_per_worker is None
    assert on_devices(cfg, gpus=True).pool.gpus_per_worker == 4
    assert on_devices(cfg, gpus=False).pool.gpus_per_worker == 0
    given = generate(tensor_parallel=2, gpus_per_worker=3)
    assert on_devices(given, gpus=False) is given and on_devices(given, gpus=True) is given


def test_unset_use_gpu_follows_the_cluster_and_a_given_value_stays():
    ppo = PPOConfig(policy="m", reward_fn="brevity", prompts="p", out="o")
    assert on_devices(ppo, gpus=True).learner.use_gpu is True
    assert on_devices(ppo, gpus=False).learner.use_gpu is False
    sft = load_config(SFTConfig, overrides={"model": "m", "data": ["d"], "out": "o",
                                                 "use_gpu": False})
    assert on_devices(sft, gpus=True) is sft


def test_nccl_sync_on_a_cluster_without_gpus_is_refused_once_decided():
    ppo = load_config(PPOConfig, overrides={"policy": "m", "reward_fn": "brevity", "prompts": "p", "out": "o",
                                            "sync_transport": "nccl"})
    assert on_devices(ppo, gpus=True).learner.use_gpu
    with pytest.raises(ConfigError, match="--sync-transport nccl needs --use-gpu"):
        on_devices(ppo, gpus=False)


def node(memory: float | None, address: str = "10.0.0.1", kind: str = "A10G") -> GpuNode:
    return GpuNode(f"{address}-id", address, 4, kind, memory, "its label" if memory else "no NVML, no nvidia-smi")


def test_auto_plans_for_the_smallest_gpu_and_names_its_node():
    budget = gpu_budget("auto", read_nodes=lambda: [node(80, "10.0.0.1", "H100"), node(24, "10.0.0.2")])
    assert budget.gib == 24 and "node 10.0.0.2" in budget.origin and "A10G" in budget.origin
    assert "smallest of 2 GPU nodes" in budget.origin
    assert gpu_budget(40.0).gib == 40
    assert gpu_budget("auto", read_nodes=list).gib is None


def test_a_gpu_node_whose_memory_cannot_be_read_is_named():
    with pytest.raises(ConfigError, match=r"node 10\.0\.0\.9 .*no NVML.*ray-cai/gpu-memory-gib=N"):
        gpu_budget("auto", read_nodes=lambda: [node(24), node(None, "10.0.0.9")])


@pytest.mark.parametrize("value", [0, -1, "big", True])
def test_gpu_memory_setting_is_auto_or_a_positive_number(value):
    with pytest.raises(ConfigError, match="expected auto or a number"):
        gpu_memory_setting(value)


def test_nvidia_smi_memory_lines_are_mib():
    assert parse_smi_memory("81559\n81559\n") == [81559 / 1024] * 2


@pytest.mark.slow
def test_on_a_cluster_with_logical_gpus(tiny_model):
    result, _ = run_scenario(Path(__file__).with_name("devices_scenario.py"), tiny_model, timeout=600)
    plan = result["plan"]
    assert plan["rc"] == 1, plan
    assert "stage `ppo` does not fit" in plan["err"] and "stage `sft`" not in plan["err"], plan["err"]
    assert f"GPU memory: node {result['gpu_address']} ({result['gpu_node'][:12]})" in plan["out"], plan["out"]
    assert "GPUs of 24 GiB" in plan["out"] and "label ray-cai/gpu-memory-gib" in plan["out"]
    generated = result["generate"]
    assert result["unset_gpus_per_worker"] is None and generated["gpus_per_worker"] == 1
    assert generated["workers_peak"] == 2, "one engine per GPU of the GPU node, none on the CPU-only node"
    assert generated["rows_out"] == generated["rows_in"] and generated["rejected"] == 0
    assert result["ppo_use_gpu"] == {"unset": None, "on_cluster": True}
    unread = result["plan_unread"]
    assert unread["rc"] == 2 and "could not read the GPU memory of node" in unread["err"], unread
    assert "no NVML bindings" in unread["err"] and len(unread["err"].strip().splitlines()) == 1


@pytest.mark.slow
def test_gpus_asked_of_a_local_cluster_without_any_are_refused_by_node(tiny_model, tmp_path):
    """No RAY_ADDRESS: cai starts a local instance of this machine (no GPU), which nothing will grow."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_CAI_DASHBOARD": "0"}
    done = subprocess.run([sys.executable, "-m", "workflows.cli.main", "generate", "--model", tiny_model, "--constitution", "harmless",
                           "--prompts", str(prompts), "--out", str(tmp_path / "run"), "--gpus-per-worker", "1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "each worker needs 1 CPU + 1 GPU on one node" in done.stderr, done.stderr[-3000:]
    assert "GPU 0 -> 0 such worker(s)" in done.stderr and "No node has a GPU" in done.stderr
    assert "Traceback" not in done.stderr
    assert not list((tmp_path / "run").glob("data/*.parquet")), "no engine started"
