"""`cai plan` on the shipped configs, and `cai run` refusing a config that cannot fit (no Ray, no network)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from core.config import load_config, read_yaml
from core.memory_plan import GIB, MemoryPlanError, check_fits
from workflows.cli.main import main
from workflows.pipeline import PipelineConfig, load_pipeline_config, plan
from workflows.plan import DEFAULT_PROMPT_TOKENS, check_run_memory, memory_plan, shape_finder, stage_plans

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = str(ROOT / "configs" / "cluster.yaml")
# a Llama-shaped config.json is all the plan reads from a model directory
TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 128, "num_hidden_layers": 2,
               "intermediate_size": 256, "vocab_size": 512, "num_attention_heads": 2, "num_key_value_heads": 1,
               "head_dim": 64, "max_position_embeddings": 4096, "tie_word_embeddings": False, "dtype": "float32"}


def pipeline_stages(path, *overrides: str):
    cfg = load_pipeline_config(path, list(overrides))
    return cfg, plan(cfg)


def by_device(plans):
    return {(p.stage, p.device): p for p in plans}


def test_cluster_config_fits_80_gib_gpus(capsys):
    assert main(["plan", "--config", CLUSTER, "--gpu-memory-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "fits: every stage fits its devices" in out and "GPU memory: as given" in out
    for stage in ("generate", "sft", "label", "rm", "ppo", "eval"):
        assert f"\n{stage} " in out


def test_cluster_config_is_refused_on_4_gib_gpus_naming_a_stage(capsys):
    assert main(["plan", "--config", CLUSTER, "--gpu-memory-gib", "4"]) == 1
    err = capsys.readouterr().err
    assert "stage `generate` does not fit" in err and "largest term is weights" in err


def test_json_report(capsys):
    assert main(["plan", "--config", CLUSTER, "--json", "--gpu-memory-gib", "80"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] and report["gpu_memory_gib"] == 80
    ppo = [row for row in report["stages"] if row["stage"] == "ppo"]
    assert [row["device"] for row in ppo] == ["fsdp learner", "frozen actor", "rollout engine"]
    assert all(row["kind"] == "gpu" and row["total_gib"] <= row["budget_gib"] for row in report["stages"])


def test_the_cluster_config_needs_what_it_sets():
    """Its settings are what make a 7B model fit: DDP replicas, frozen models on every learner or
    activations kept without recomputation do not."""
    with pytest.raises(MemoryPlanError, match="stage `sft`.*largest term is optimizer"):
        check(*pipeline_stages(CLUSTER, "sft.strategy=ddp"))
    with pytest.raises(MemoryPlanError, match="stage `ppo`"):
        check(*pipeline_stages(CLUSTER, "ppo.frozen_on=learners"))
    for stage in ("rm", "ppo"):
        with pytest.raises(MemoryPlanError, match=f"stage `{stage}`.*largest term is activations"):
            check(*pipeline_stages(CLUSTER, f"{stage}.gradient_checkpointing=false"))


def test_gradient_checkpointing_shrinks_the_activations_term():
    cfg, stages = pipeline_stages(CLUSTER)
    on = by_device(memory_plan(cfg.model, stages))
    cfg, stages = pipeline_stages(CLUSTER, "sft.gradient_checkpointing=false", "ppo.gradient_checkpointing=false")
    off = by_device(memory_plan(cfg.model, stages))
    for key in (("sft", "fsdp learner"), ("ppo", "fsdp learner")):
        assert on[key].terms["activations"] < off[key].terms["activations"] / 10
        assert {k: v for k, v in on[key].terms.items() if k != "activations"} == {
            k: v for k, v in off[key].terms.items() if k != "activations"}


def check(cfg, stages, gpu_gib=80):
    check_fits(memory_plan(cfg.model, stages), int(gpu_gib * GIB))


def test_models_the_pipeline_trains_have_the_base_models_shape():
    cfg, stages = pipeline_stages(CLUSTER)
    plans = by_device(memory_plan(cfg.model, stages))
    # the PPO policy is OUT/sft, which does not exist yet; the reward model OUT/rm has a one-output head
    assert plans["ppo", "rollout engine"].terms == plans["generate", "engine"].terms
    assert plans["rm", "fsdp learner"].terms["logits"] < plans["sft", "fsdp learner"].terms["logits"] / 1000
    # label: the SFT policy's engine and the base model's as feedback model, each of the base's shape
    assert plans["label", "policy engine"].terms == plans["label", "feedback engine"].terms == plans[
        "generate", "engine"].terms


def test_two_label_engines_on_one_gpu_each_get_half_its_share():
    """As workflows.label.worker_engines starts them: vLLM refuses a second engine that asks for
    the whole 0.85 of a GPU the first already holds."""
    cfg, stages = pipeline_stages(CLUSTER)
    plans = by_device(memory_plan(cfg.model, stages))
    whole = plans["generate", "engine"].usable_fraction
    assert whole == 0.85
    assert plans["label", "policy engine"].usable_fraction == plans["label", "feedback engine"].usable_fraction == 0.425
    assert "0.425 each" in plans["label", "policy engine"].notes[0]
    # the same model in both roles: one engine serves both, with the whole share
    label = next(stage for stage in stages if stage.name == "label")
    shared = replace(label, config=replace(label.config, feedback_model=""))
    (engine,) = stage_plans(shared, shape_finder(cfg.model, stages), DEFAULT_PROMPT_TOKENS)
    assert engine.device == "engine" and engine.usable_fraction == whole and not engine.notes
    # each engine is checked against its half: 15.9 GiB fits 0.425 x 40 GiB = 17 GiB, not 0.425 x 36
    label_plans = [plans["label", "policy engine"], plans["label", "feedback engine"]]
    check_fits(label_plans, 40 * GIB)
    with pytest.raises(MemoryPlanError, match=r"stage `label`.*each policy engine.*42\.5% of 36 GiB"):
        check_fits(label_plans, 36 * GIB)


def test_lora_and_dpo_references():
    cfg, stages = pipeline_stages(CLUSTER, "rl=dpo", "dpo.workers=8", "dpo.use_gpu=true")
    full = by_device(memory_plan(cfg.model, stages))["dpo", "ddp learner"]
    assert full.terms["frozen models"] > 0  # the reference: TRL's frozen copy, in the float32 masters' dtype
    cfg, stages = pipeline_stages(CLUSTER, "rl=dpo", "dpo.workers=8", "dpo.use_gpu=true", "dpo.strategy=fsdp")
    sharded = by_device(memory_plan(cfg.model, stages))["dpo", "fsdp learner"]
    # under FSDP it is sharded over the 8 learners and stored in bf16, the policy's compute dtype
    assert sharded.terms["frozen models"] == full.terms["frozen models"] // 16
    cfg, stages = pipeline_stages(CLUSTER, "rl=dpo", "dpo.workers=8", "dpo.use_gpu=true", "dpo.lora_r=16")
    lora = by_device(memory_plan(cfg.model, stages))["dpo", "ddp learner"]
    assert "frozen models" not in lora.terms  # the base under disabled adapters is the reference
    assert lora.terms["optimizer"] < full.terms["optimizer"] / 100


def test_frozen_models_move_to_their_own_actors():
    cfg, stages = pipeline_stages(CLUSTER, "ppo.frozen_on=learners")
    learners = by_device(memory_plan(cfg.model, stages))
    assert ("ppo", "frozen actor") not in learners and learners["ppo", "fsdp learner"].terms["frozen models"] > 0
    cfg, stages = pipeline_stages(CLUSTER)
    actors = by_device(memory_plan(cfg.model, stages))
    assert "frozen models" not in actors["ppo", "fsdp learner"].terms
    assert actors["ppo", "frozen actor"].terms["frozen models"] == learners["ppo", "fsdp learner"].terms["frozen models"]


def test_a_tiny_local_model_on_cpu_passes_run_s_check(tmp_path):
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_CONFIG))
    cfg = load_config(PipelineConfig, overrides={"model": str(model), "prompts": "p.jsonl", "out": str(tmp_path / "run"),
                                                 "eval_prompts": "e.jsonl"})
    stages = plan(cfg)
    check_run_memory(cfg.model, stages, log=pytest.fail)  # every stage sized, and fits on this machine
    assert all(not p.gpu for p in memory_plan(cfg.model, stages))


def test_an_unknown_hub_model_is_an_error_for_plan_and_unchecked_for_run(tmp_path, capsys):
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"model": "someorg/unknown-model", "prompts": "p.jsonl", "out": str(tmp_path)}))
    assert main(["plan", "--config", str(config)]) == 2
    assert "'someorg/unknown-model'" in capsys.readouterr().err
    logged = []
    cfg = load_config(PipelineConfig, overrides=read_yaml(config))
    check_run_memory(cfg.model, plan(cfg), log=logged.append)
    assert logged and all("not checked" in line for line in logged)


@pytest.mark.parametrize("model, gpu_gib, flag", [("meta-llama/Llama-3.1-70B-Instruct", 80, []),
                                                  ("Qwen/Qwen2.5-7B-Instruct", 80, ["--gpu-memory-gib", "4"])])
def test_cai_run_refuses_before_any_stage_starts(tmp_path, capsys, model, gpu_gib, flag):
    """The GPU size from the config (``gpu_memory_gib``), or from the flag over it."""
    out = tmp_path / "run"
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"model": model, "prompts": str(ROOT / "data/prompts/train.jsonl"),
                                      "out": str(out), "generate": {"gpus_per_worker": 1}, "gpu_memory_gib": gpu_gib}))
    assert main(["run", "--config", str(config), *flag]) == 2
    err = capsys.readouterr().err
    assert "stage `generate` does not fit" in err and "largest term is weights" in err
    assert not out.exists(), "a stage started"
