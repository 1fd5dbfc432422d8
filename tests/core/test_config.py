"""Job configs: defaults <- YAML <- flags <- overrides, one help text per field, errors that name the field."""

import argparse
import re
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from core.config import (
    REQUIRED,
    ConfigError,
    add_config_arguments,
    config_help,
    config_to_dict,
    load_config,
    option,
)


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = option(0.7, "sampling temperature (0 = greedy)")
    max_new_tokens: int = option(128, "tokens to generate per answer")
    do_sample: bool = option(True, "sample instead of greedy decoding")


@dataclass(frozen=True)
class JobConfig:
    model: str = option(REQUIRED, "local model directory or hub id")
    out_dir: str = option("out", "directory for results")
    seed: int = option(0, "random seed")
    stages: list[str] = option(["critique", "revision"], "stages to run, in order")
    precision: Literal["bf16", "fp32"] = option("bf16", "weight dtype")
    shards: int = option(4, "how many shards to split the prompts into", choices=[1, 2, 4, 8])
    gpus: float = option(0, "GPUs per engine actor", flag="--gpus-per-engine")
    limit: Optional[int] = option(None, "use only the first N prompts (default: all)")
    sampling: SamplingConfig = option(SamplingConfig(), "how responses are sampled")

    def __post_init__(self):
        if self.precision == "bf16" and self.gpus == 0:
            raise ConfigError("precision: bf16 needs --gpus-per-engine > 0 (use --precision fp32 on the CPU)")


@dataclass(frozen=True)
class PositionalConfig:
    prompts: list[str] = option(REQUIRED, "user messages to answer", positional=True)
    name: str = option(REQUIRED, "run name", positional=False)


def parse(cls, argv):
    parser = argparse.ArgumentParser(prog="cai test")
    add_config_arguments(parser, cls)
    return parser.parse_args(argv)


def write_yaml(tmp_path, data, name="job.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def test_defaults_then_yaml_then_flags_then_overrides(tmp_path):
    config_file = write_yaml(tmp_path, {"model": "m", "seed": 1, "out_dir": "yaml-out", "gpus": 1})
    args = parse(JobConfig, ["--config", config_file, "--seed", "2"])
    cfg = load_config(JobConfig, args)
    assert (cfg.model, cfg.seed, cfg.out_dir, cfg.gpus, cfg.precision) == ("m", 2, "yaml-out", 1.0, "bf16")
    assert isinstance(cfg.gpus, float), "an int in YAML is fine for a float field and becomes a float"
    assert load_config(JobConfig, args, overrides={"seed": 3}).seed == 3
    assert load_config(JobConfig, config_file=config_file).seed == 1
    cli_only = load_config(JobConfig, parse(JobConfig, ["--model", "x", "--gpus-per-engine", "0.5"]))
    assert (cli_only.model, cli_only.gpus, cli_only.out_dir, cli_only.limit) == ("x", 0.5, "out", None)


def test_flags_not_given_leave_no_trace_in_the_namespace():
    args = parse(JobConfig, ["--model", "m"])
    assert vars(args) == {"config": None, "model": "m"}


def test_bool_flags_turn_on_and_off(tmp_path):
    config_file = write_yaml(tmp_path, {"model": "m", "gpus": 1, "sampling": {"do_sample": False}})
    assert load_config(JobConfig, parse(JobConfig, ["--config", config_file])).sampling.do_sample is False
    assert load_config(JobConfig, parse(JobConfig, ["--config", config_file, "--do-sample"])).sampling.do_sample
    args = parse(JobConfig, ["--model", "m", "--gpus-per-engine", "1", "--no-do-sample"])
    assert load_config(JobConfig, args).sampling.do_sample is False


def test_list_fields_from_flags_and_yaml(tmp_path):
    args = parse(JobConfig, ["--model", "m", "--gpus-per-engine", "1", "--stages", "revision"])
    assert load_config(JobConfig, args).stages == ["revision"]
    config_file = write_yaml(tmp_path, {"model": "m", "gpus": 1, "stages": ["a", "b", "c"]})
    assert load_config(JobConfig, config_file=config_file).stages == ["a", "b", "c"]
    with pytest.raises(ConfigError, match=r"`stages` in .*job.yaml: expected a list with str items, got list"):
        load_config(JobConfig, config_file=write_yaml(tmp_path, {"model": "m", "stages": ["a", 3]}))


def test_mutable_defaults_are_not_shared():
    first = load_config(JobConfig, overrides={"model": "m", "gpus": 1})
    first.stages.append("oops")
    assert load_config(JobConfig, overrides={"model": "m", "gpus": 1}).stages == ["critique", "revision"]


def test_literal_and_explicit_choices(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse(JobConfig, ["--model", "m", "--precision", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"invalid `precision` in .*job.yaml: expected one of 'bf16', 'fp32'"):
        load_config(JobConfig, config_file=write_yaml(tmp_path, {"model": "m", "precision": "fp16"}))
    with pytest.raises(ConfigError, match=r"invalid `shards` in overrides: 3 is not one of 1, 2, 4, 8"):
        load_config(JobConfig, overrides={"model": "m", "gpus": 1, "shards": 3})
    assert load_config(JobConfig, parse(JobConfig, ["--model", "m", "--precision", "fp32"])).precision == "fp32"


def test_nested_config_flattened_flags_and_nested_or_flat_yaml(tmp_path):
    args = parse(JobConfig, ["--model", "m", "--gpus-per-engine", "1", "--temperature", "0", "--max-new-tokens", "9"])
    assert load_config(JobConfig, args).sampling == SamplingConfig(temperature=0.0, max_new_tokens=9)
    nested = write_yaml(tmp_path, {"model": "m", "gpus": 1, "sampling": {"temperature": 0.2}}, "nested.yaml")
    flat = write_yaml(tmp_path, {"model": "m", "gpus": 1, "temperature": 0.2}, "flat.yaml")
    dashed = write_yaml(tmp_path, {"model": "m", "gpus": 1, "max-new-tokens": 7}, "dashed.yaml")
    assert load_config(JobConfig, config_file=nested) == load_config(JobConfig, config_file=flat)
    assert load_config(JobConfig, config_file=flat).sampling == SamplingConfig(temperature=0.2)
    assert load_config(JobConfig, config_file=dashed).sampling.max_new_tokens == 7
    twice = write_yaml(tmp_path, {"model": "m", "temperature": 0.1, "sampling": {"temperature": 0.2}}, "twice.yaml")
    with pytest.raises(ConfigError, match="`temperature` is given twice"):
        load_config(JobConfig, config_file=twice)


def test_nested_default_instance_wins_over_its_class_defaults():
    @dataclass(frozen=True)
    class Greedy:
        model: str = option("m", "model")
        sampling: SamplingConfig = option(SamplingConfig(temperature=0.0), "sampling")

    assert load_config(Greedy).sampling.temperature == 0.0
    assert load_config(Greedy, overrides={"max_new_tokens": 5}).sampling == SamplingConfig(0.0, 5)


def test_unknown_key_names_key_file_and_valid_keys(tmp_path):
    config_file = write_yaml(tmp_path, {"model": "m", "temprature": 0.1})
    with pytest.raises(ConfigError) as exc:
        load_config(JobConfig, config_file=config_file)
    message = str(exc.value)
    assert "'temprature'" in message and config_file in message
    assert "valid keys: model, out_dir, seed" in message and "temperature" in message and "sampling" in message
    with pytest.raises(ConfigError, match=r"unknown key 'nope' in .*job.yaml \(under `sampling`\)"):
        load_config(JobConfig, config_file=write_yaml(tmp_path, {"model": "m", "sampling": {"nope": 1}}))


def test_wrong_types_name_the_field(tmp_path):
    cases = [
        ({"model": "m", "seed": "1"}, r"invalid `seed` in .*job.yaml: expected int, got str '1'"),
        ({"model": "m", "seed": True}, r"invalid `seed` .*expected int, got bool True"),
        ({"model": "m", "gpus": "1"}, r"invalid `gpus` .*expected float, got str"),
        ({"model": 3}, r"invalid `model` .*expected str, got int 3"),
        ({"model": "m", "limit": "all"}, r"invalid `limit` .*expected int or null"),
        ({"model": "m", "do_sample": "yes"}, r"invalid `do_sample` .*expected bool"),
        ({"model": "m", "sampling": 0.5}, r"`sampling` in .*job.yaml must be a mapping"),
    ]
    for data, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            load_config(JobConfig, config_file=write_yaml(tmp_path, data))
    with pytest.raises(ConfigError, match=r"job.yaml must be a mapping of option names, got list"):
        load_config(JobConfig, config_file=write_yaml(tmp_path, "- model\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(JobConfig, config_file=write_yaml(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(JobConfig, config_file=str(tmp_path / "missing.yaml"))


def test_required_missing_names_flag_and_yaml_key():
    with pytest.raises(ConfigError, match=r"^missing required option --model \(or `model:` in the config file\)$"):
        load_config(JobConfig, parse(JobConfig, []))
    with pytest.raises(ConfigError) as exc:
        load_config(PositionalConfig, parse(PositionalConfig, []))
    assert "missing required argument PROMPTS (or `prompts:` in the config file)" in str(exc.value)
    assert "missing required option --name" in str(exc.value)


def test_positional_from_command_line_or_yaml(tmp_path):
    assert load_config(PositionalConfig, parse(PositionalConfig, ["hi", "there", "--name", "r"])).prompts == ["hi", "there"]
    config_file = write_yaml(tmp_path, {"prompts": ["from yaml"], "name": "r"})
    assert load_config(PositionalConfig, parse(PositionalConfig, ["--config", config_file])).prompts == ["from yaml"]


def test_post_init_validation_runs_after_layering():
    with pytest.raises(ConfigError, match="precision: bf16 needs --gpus-per-engine"):
        load_config(JobConfig, parse(JobConfig, ["--model", "m"]))


def test_round_trip_through_yaml(tmp_path):
    args = parse(JobConfig, ["--model", "m", "--gpus-per-engine", "1", "--limit", "5", "--temperature", "0.1",
                             "--stages", "a", "b", "--no-do-sample"])
    cfg = load_config(JobConfig, args)
    data = config_to_dict(cfg)
    assert data["sampling"] == {"temperature": 0.1, "max_new_tokens": 128, "do_sample": False}
    assert load_config(JobConfig, config_file=write_yaml(tmp_path, yaml.safe_dump(data))) == cfg


def test_help_describes_each_option_once_with_its_default():
    parser = argparse.ArgumentParser(prog="cai test")
    add_config_arguments(parser, JobConfig)
    text = parser.format_help()
    flags = ["--config", "--model", "--out-dir", "--seed", "--stages", "--precision", "--shards",
             "--gpus-per-engine", "--limit", "--temperature", "--max-new-tokens", "--do-sample"]
    for flag in flags:
        assert len(re.findall(rf"^  {re.escape(flag)}\b", text, flags=re.MULTILINE)) == 1, flag
    for name, help_text in config_help(JobConfig).items():
        assert help_text.split("(")[0].strip() in " ".join(text.split()), name
    flat = " ".join(text.split())
    assert "sampling temperature (0 = greedy) (default: 0.7)" in flat
    assert "local model directory or hub id (required)" in flat
    assert "stages to run, in order (default: critique revision)" in flat
    assert "--precision {bf16,fp32}" in flat and "--do-sample, --no-do-sample" in flat


def test_config_help_lists_every_field_once():
    assert list(config_help(JobConfig)) == ["model", "out_dir", "seed", "stages", "precision", "shards", "gpus",
                                            "limit", "sampling", "temperature", "max_new_tokens", "do_sample"]
    assert config_help(SamplingConfig)["temperature"] == "sampling temperature (0 = greedy)"


def test_declaration_mistakes_fail_loudly():
    @dataclass(frozen=True)
    class Clash:
        temperature: float = option(1.0, "outer temperature")
        sampling: SamplingConfig = option(SamplingConfig(), "sampling")

    @dataclass(frozen=True)
    class Undocumented:
        seed: int = field(default=0)

    with pytest.raises(TypeError, match="'temperature' is used twice"):
        add_config_arguments(argparse.ArgumentParser(), Clash)
    with pytest.raises(TypeError, match="Undocumented.seed: declare config fields with option"):
        add_config_arguments(argparse.ArgumentParser(), Undocumented)


def test_two_config_classes_share_one_config_flag():
    @dataclass(frozen=True)
    class Other:
        workers: int = option(2, "worker actors")

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, SamplingConfig)
    add_config_arguments(parser, Other)
    args = parser.parse_args(["--workers", "3", "--temperature", "1"])
    assert load_config(Other, args).workers == 3 and load_config(SamplingConfig, args).temperature == 1.0


def test_tuple_dict_and_path_fields_and_required_nested_options(tmp_path):
    from pathlib import Path

    @dataclass(frozen=True)
    class EngineConfig:
        engine_model: str = option(REQUIRED, "model the engine serves")
        engine_kwargs: dict[str, int] = option({}, "extra engine keyword arguments")

    @dataclass(frozen=True)
    class Typed:
        sizes: tuple[int, ...] = option((1, 2), "batch sizes to try")
        out: Path = option(Path("out"), "output directory")
        engine: EngineConfig = option(REQUIRED, "the vLLM engine")

    args = parse(Typed, ["--sizes", "3", "4", "--engine-model", "m", "--engine-kwargs", '{"max_num_seqs": 8}'])
    cfg = load_config(Typed, args)
    assert cfg == Typed(sizes=(3, 4), out=Path("out"), engine=EngineConfig(engine_model="m", engine_kwargs={"max_num_seqs": 8}))
    assert load_config(Typed, config_file=write_yaml(tmp_path, config_to_dict(cfg))) == cfg
    with pytest.raises(ConfigError, match=r"invalid `engine_kwargs` in overrides: expected a mapping with int items, got dict"):
        load_config(Typed, overrides={"engine": {"engine_model": "m", "engine_kwargs": {"a": "b"}}})
    with pytest.raises(ConfigError, match="missing required option --engine-model"):
        load_config(Typed)


def test_range_checks_state_the_value_and_the_range_once():
    from core.config import Rule, above, at_least, at_most, below, failing, require_valid

    checks = {"samples": at_least(2).because("a pair needs two answers")(1), "top_p": (above(0) & at_most(1))(1.5),
              "eval_split": (at_least(0) & below(1))(0.5), "gpus": at_least(0).or_none()(None),
              "name": Rule("an absolute path", lambda p: p.startswith("/"))("rel"), "legacy": False, "fine": True}
    problems = failing(checks)
    assert [str(p) for p in problems] == ["--samples: 1 (at least 2: a pair needs two answers)",
                                          "--top-p: 1.5 (above 0 and at most 1)", "--name: 'rel' (an absolute path)",
                                          "--legacy"]
    with pytest.raises(ConfigError, match=r"^invalid value for --samples: 1 \(at least 2: a pair needs two answers\); "
                                          r"--top-p: 1\.5 \(above 0 and at most 1\); --name: 'rel' \(an absolute "
                                          r"path\); --legacy; --beta$"):
        require_valid(problems, ["beta"])
    require_valid([], failing({"fine": at_least(0)(0)}))  # nothing to say
