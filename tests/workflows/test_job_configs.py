"""Job configs: each field declared once and read by the CLI, the YAML loader and the run
identity; invalid combinations refused with messages that name the flags."""

import re

import pytest

from core.config import (
    ConfigError, config_options, identity, identity_defaults, load_config, option_flag, recorded_identity,
)
from core.run_identity import same_identity
from workflows.cli.main import main
from workflows.cli.registry import COMMANDS
from workflows.eval_compare import EvalCompareConfig
from workflows.generate import GenerateConfig
from workflows.label import LabelConfig
from workflows.runtime.devices import on_devices
from learners.hf_configs import DPOConfig, SFTConfig

BASE = dict(constitution="harmless", prompts="p.jsonl", out="o")


def test_generate_config_names_invalid_flags():
    with pytest.raises(ConfigError, match=r"^invalid value for --revisions: -1 \(at least 0\); --top-p: 0\.0 \(above 0 "
                                          r"and at most 1\); --shard-size: 0 \(at least 1\)$"):
        load_config(GenerateConfig, overrides=dict(model="m", **BASE, revisions=-1, top_p=0.0, shard_size=0))
    with pytest.raises(ConfigError, match="--gpus-per-worker must be at least --tensor-parallel"):
        load_config(GenerateConfig, overrides=dict(model="m", **BASE, gpus_per_worker=1, tensor_parallel=2))


def test_label_config_needs_two_samples_and_consistent_pairs():
    with pytest.raises(ConfigError, match=r"^invalid value for --samples: 1 \(at least 2: a pair needs two answers\); "
                                          r"--max-pairs: 2 \(above 0 with --pairs random, and 0 with any other --pairs\)$"):
        load_config(LabelConfig, overrides=dict(policy="m", **BASE, samples=1, max_pairs=2))
    config = load_config(LabelConfig, overrides=dict(policy="m", **BASE, samples=4, pairs="random", max_pairs=2))
    assert config.labelling.max_pairs == 2 and config.pool.shard_size == 64


def test_train_config_names_invalid_flags():
    with pytest.raises(ConfigError, match=r"^invalid value for --eval-split: 1.5 \(at least 0 and below 1\); --beta: 0.0 \(above 0\)$"):
        load_config(DPOConfig, overrides=dict(model="m", data=["d"], out="o", eval_split=1.5, beta=0))
    with pytest.raises(ConfigError, match=r"unknown key 'beta'"):  # DPO's own field
        load_config(SFTConfig, overrides=dict(model="m", data=["d"], out="o", beta=0.2))


JOB_CONFIGS = [command.config for command in COMMANDS if command.config is not None]


def test_the_cli_the_yaml_loader_and_the_identity_read_the_dataclass_fields(capsys):
    """Each job's flags, its YAML keys and its run identity all come from one declaration per field."""
    for command in COMMANDS:
        if command.config is None:
            continue
        options = config_options(command.config)
        with pytest.raises(SystemExit):
            main([*command.words, "--help"])
        shown = set(re.findall(r"^  (--[\w-]+)", capsys.readouterr().out, flags=re.MULTILINE))
        declared = {option_flag(name, f) for name, f in options.items() if not f.metadata["positional"]}
        assert shown - {"--help", "--config"} == declared, command.words
        with pytest.raises(ConfigError) as error:
            load_config(command.config, overrides={"not_an_option": 1})
        valid = error.value.args[0].split("valid keys: ")[1].split(", ")
        assert set(options) <= set(valid), command.words
        marked = {name for name, f in options.items() if f.metadata["identity"]}
        writes_no_run = [["models", "chat"]]
        assert marked or list(command.words) in writes_no_run, f"{command.words}: no field is part of the run's identity"


def test_identities_keep_the_keys_of_the_manifests_already_written():
    """Run folders written before identities came from field metadata still resume."""
    generate = load_config(GenerateConfig, overrides=dict(model="m", **BASE))
    assert set(identity(generate, model="/m", constitution_sha256="c", prompts="p")) == {
        "model", "constitution_sha256", "prompts", "shard_size", "limit", "revisions", "few_shot", "few_shot_initial",
        "principle_draw", "max_new_tokens", "temperature", "top_p", "repetition_penalty", "ignore_eos", "seed",
        "prompt_split", "prompt_column"}  # the last two added since: records without them still match
    recorded = identity(generate, model="/m", constitution_sha256="c", prompts="p")
    old = {k: v for k, v in recorded.items() if k not in ("prompt_split", "prompt_column")}
    assert same_identity(old, recorded)
    label = load_config(LabelConfig, overrides=dict(policy="m", **BASE))
    assert set(identity(label, policy="/m", feedback_model="/f", constitution_sha256="c", prompts="p")) == {
        "policy", "feedback_model", "constitution_sha256", "prompts", "shard_size", "limit", "samples", "pairs",
        "max_pairs", "principles", "both_orders", "cot", "cot_max_new_tokens", "feedback_few_shot", "max_new_tokens",
        "temperature", "top_p", "repetition_penalty", "seed", "prompt_split", "prompt_column"}
    compare = load_config(EvalCompareConfig, overrides=dict(model_a="a", model_b=["b"], judge="j", constitution="c",
                                                           prompts="p", out="o"))
    answers = identity(compare.answers, model="/a", prompts="p", shard_size=64)
    assert set(answers) == {"model", "prompts", "shard_size", "samples_per_prompt", "seed", "max_new_tokens",
                            "temperature", "top_p", "repetition_penalty"}  # "samples" before: see RENAMED_KEYS
    contest = dict(baseline="a", challengers=["b"], seed=0)
    assert set(identity(compare.judging, judge="/j", prompts="p", answers="s", constitutions={}, shard_size=64,
                        **contest)) == {"judge", "prompts", "answers", "constitutions", "shard_size", "baseline",
                                        "challengers", "principles", "feedback_few_shot", "seed"}


def test_a_training_summary_of_the_old_layout_reads_as_the_same_identity():
    # as run_train records it on a CPU cluster: --use-gpu, left unset, decided there (False)
    sft = on_devices(load_config(SFTConfig, overrides=dict(model="m", data=["d"], out="o", lr=1e-3, workers=2)), False)
    old = {"model": "m", "data": ["d"], "out": "o", "beta": 0.1, "sft_targets": "all", "trust_remote_code": False,
           "training": {"workers": 2, "use_gpu": False, "epochs": 1.0, "max_steps": 0, "lr": 1e-3, "batch_size": 4,
                        "grad_accum": 1, "max_length": 1024, "eval_split": 0.1, "save_steps": 50,
                        "logging_steps": 5, "storage_path": "", "max_failures": 0, "report_to": "none", "seed": 0},
           "cluster": {"run_name": ""}}
    # settings added since (strategy, LoRA) are absent from the old record: they match at their defaults
    defaults = identity_defaults(SFTConfig)
    assert same_identity(recorded_identity(SFTConfig, old), identity(sft), defaults)
    assert not same_identity(recorded_identity(SFTConfig, {**old, "training": {**old["training"], "lr": 2e-3}}),
                             identity(sft), defaults)
    lora = load_config(SFTConfig, overrides=dict(model="m", data=["d"], out="o", lr=1e-3, workers=2, lora_r=8))
    assert not same_identity(recorded_identity(SFTConfig, old), identity(lora), defaults), "a LoRA run is another run"



# Declared in files that are moving to learners/; their checks still name the flag alone.


def leaves(cls) -> dict[str, tuple[object, str, bool]]:
    """Option name -> (type, module of the class that declares it, required), nested groups walked."""
    import dataclasses
    import typing

    found = {}
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            found.update(leaves(hint))
        else:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            found[f.name] = (hint, cls.__module__, required)
    return found


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.config is not None], ids=lambda c: " ".join(c.words))
def test_every_range_check_says_the_value_and_the_range(command):
    """Every number set to -1: each flag refused says what it got and what it takes."""
    options = leaves(command.config)
    overrides = {name: -1 if hint is int else -1.0 for name, (hint, _, _) in options.items() if hint in (int, float)}
    overrides.update({name: "x" if hint is str else ["x"] for name, (hint, _, required) in options.items() if required})
    with pytest.raises(ConfigError) as error:
        load_config(command.config, overrides=overrides)
    message = str(error.value)
    assert message.startswith("invalid value for --"), message
    for part in message.removeprefix("invalid value for ").split("; "):
        name = part.split(":")[0][2:].replace("-", "_")
        assert re.fullmatch(r"--[\w-]+: \S+ \(.+\)", part), f"cai {' '.join(command.words)}: {part!r} says no range"
