"""`cai run` and `cai status`: config wiring (fast), then every stage on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from core.config import ConfigError, load_config, read_yaml
from core.prompt_data import PromptOptions
from workflows.cli.main import main
from workflows.pipeline import PipelineConfig, analysis_config, load_pipeline_config, merge, parse_overrides, plan

ROOT = Path(__file__).resolve().parents[2]


def test_overrides_nest_dotted_keys_and_read_values_as_yaml():
    assert parse_overrides(["rl=dpo", "generate.revisions=2", "ppo.lr=1e-6", "generate.pool.workers=3"]) == {
        "rl": "dpo", "generate": {"revisions": 2, "pool": {"workers": 3}}, "ppo": {"lr": "1e-6"}}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["generate.revisions"])
    assert merge({"generate": {"revisions": 1, "seed": 0}}, {"generate": {"revisions": 2}}) == {
        "generate": {"revisions": 2, "seed": 0}}


@pytest.mark.parametrize("name", ["demo.yaml", "cluster.yaml"])
def test_shipped_pipeline_configs_plan_every_stage(name):
    cfg = load_config(PipelineConfig, overrides=read_yaml(ROOT / "configs" / name))
    stages = plan(cfg)
    assert [s.name for s in stages] == ["generate", "sft", "label", "rm", "ppo", "eval"]
    by_name = {s.name: s for s in stages}
    # the wiring: SFT trains on SL-CAI data, labels come from the SFT policy, PPO uses the RM
    assert by_name["sft"].config.data == [str(by_name["generate"].out)]
    assert by_name["label"].config.policy == str(by_name["sft"].out)
    assert by_name["ppo"].config.reward_model == str(by_name["rm"].out)
    assert list(by_name["eval"].config.model_b) == [str(by_name["sft"].out), str(by_name["ppo"].out)]


def test_a_bad_section_names_the_section(tmp_path):
    base = dict(model="m", prompts="p.jsonl", out=str(tmp_path))
    with pytest.raises(ConfigError, match="in section `generate`: unknown key 'revisons'"):
        plan(load_config(PipelineConfig, overrides={**base, "generate": {"revisons": 2}}))
    with pytest.raises(ConfigError, match="`sft.model` is set by the pipeline"):
        plan(load_config(PipelineConfig, overrides={**base, "sft": {"model": "x"}}))
    assert [s.name for s in plan(load_config(PipelineConfig, overrides={**base, "rl": "dpo"}))][-1] == "dpo"
    # YAML 1.1 reads 1e-6 as a string; a float option takes it as the number
    (ppo,) = [s for s in plan(load_config(PipelineConfig, overrides={**base, "ppo": {"lr": "1e-6"}})) if s.name == "ppo"]
    assert ppo.config.learner.lr == 1e-6


def test_the_run_ends_with_the_analysis_of_its_generate_label_and_eval_stages(tmp_path):
    base = dict(model="m", prompts="p.jsonl", eval_prompts="e.jsonl", out=str(tmp_path))
    cfg = load_config(PipelineConfig, overrides={**base, "analyze": {"judge": "default", "bootstrap": 500}})
    analysis = analysis_config(cfg, plan(cfg))
    assert [Path(r).name for r in analysis.runs] == ["sl-cai", "rl-cai", "eval"]
    assert analysis.out == str(tmp_path.resolve() / "analysis") and analysis.judge == "default"
    with pytest.raises(ConfigError, match="`analyze.out` is set by the pipeline"):
        bad = load_config(PipelineConfig, overrides={**base, "analyze": {"out": "x"}})
        analysis_config(bad, plan(bad))


def test_the_prompt_split_and_column_reach_the_stages_that_read_prompts(tmp_path):
    base = dict(model="m", prompts="hf:Anthropic/hh-rlhf/harmless-base", out=str(tmp_path))
    stages = {s.name: s.config for s in plan(load_config(PipelineConfig, overrides={
        **base, "prompt_source": {"prompt_split": "test", "prompt_column": "rejected"}}))}
    for name in ("generate", "label"):
        assert (stages[name].prompts, stages[name].prompt_source) == (
            base["prompts"], PromptOptions(prompt_split="test", prompt_column="rejected"))
    (generate, *_) = plan(load_config(PipelineConfig, overrides={**base, "generate": {"prompt_column": "chosen"}}))
    assert generate.config.prompt_source == PromptOptions(prompt_column="chosen")
    config = tmp_path / "run.yaml"
    config.write_text(f"model: m\nprompts: {base['prompts']}\nout: {tmp_path}\n")
    assert load_pipeline_config(config, [], base_dir=tmp_path).prompts == base["prompts"], "hf: is not a path"


ENGINE = {"enforce_eager": True, "max_model_len": 1024}


@pytest.mark.slow
def test_cai_run_goes_through_every_stage_and_a_rerun_skips_them(ray_local, tiny_model, tmp_path, capsys):
    """SL-CAI -> SFT -> label -> DPO through `cai run`: each stage reads the one before it. The RM,
    PPO and eval stages run the same job functions that test_train.py, test_ppo.py and
    test_eval_compare.py run on the real stack, and their wiring is checked by the plan tests above
    (`make demo` runs all six). DPO fine-tunes fully under FSDP in bf16: rank 0 alone reads the
    policy and the reference (learners.hf_sharding: trained_model, fsdp_reference) and the other
    learner receives its shards, so at the first step the two are the same computation on both
    ranks and the loss, averaged over the ranks, is log 2 (a rank holding other weights, such as
    the zeros transformers gives TRL's own reference there, would move it)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"How do I do task {i}?"}) + "\n" for i in range(8)))
    train = {"workers": 1, "max_steps": 2, "batch_size": 2, "max_length": 256, "eval_split": 0.0, "lr": 1e-3}
    config = tmp_path / "pipeline.yaml"
    import yaml

    config.write_text(yaml.safe_dump({
        "model": tiny_model, "prompts": str(prompts), "out": str(tmp_path / "run"), "rl": "dpo",
        # the SFT model labels its own answers: one engine in the label stage instead of two
        "feedback_model": str(tmp_path / "run" / "sft"),
        "generate": {"max_new_tokens": 12, "shard_size": 8, "workers": 1, **ENGINE},
        "sft": train, "dpo": {**train, "workers": 2, "strategy": "fsdp", "compute_dtype": "bfloat16", "logging_steps": 1},
        "label": {"samples": 2, "max_new_tokens": 12, "shard_size": 8, "workers": 1, **ENGINE},
    }))
    assert main(["run", "--config", str(config)]) == 0
    run = tmp_path / "run"
    record = json.loads((run / "pipeline.json").read_text())
    assert list(record["stages"]) == ["generate", "sft", "label", "dpo"]
    assert all(stage["status"] == "done" for stage in record["stages"].values())
    assert record["stages"]["generate"]["summary"]["rows_out"] == 8
    for model_dir in ("sft", "dpo"):
        assert (run / model_dir / "model.safetensors").stat().st_size > 0
        assert (run / model_dir / "training_summary.json").exists()
    import pyarrow.parquet as pq

    labelled = pq.read_table(run / "rl-cai" / "data", columns=["policy_model"]).to_pylist()
    assert labelled and {Path(r["policy_model"]).name for r in labelled} == {"sft"}, "the SFT policy sampled them"
    dpo = json.loads((run / "dpo" / "training_summary.json").read_text())
    assert dpo["metrics"]["global_step"] == 2
    # `cai run` ends with the analysis of its stages
    analysis = json.loads((run / "analysis" / "analysis.json").read_text())
    assert [r["kind"] for r in analysis["runs"]] == ["generate", "label"]
    assert Path(record["analysis"]).exists() and len(analysis["figures"]) >= 3
    first = dpo["history"][0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-5), first

    capsys.readouterr()
    assert main(["run", "--config", str(config)]) == 0
    rerun = json.loads((run / "pipeline.json").read_text())
    assert all(stage.get("skipped") for stage in rerun["stages"].values()), "completed stages were skipped"
    assert "skipped" in capsys.readouterr().out

    assert main(["status", str(run)]) == 0
    status = capsys.readouterr().out
    assert "generate  done" in status and "shards 1/1" in status and "dpo" in status
    assert f"analysis: {run / 'analysis' / 'report.md'}" in status
