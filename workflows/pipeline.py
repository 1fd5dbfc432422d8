"""`cai run`: the whole Constitutional AI method, stage by stage, in one run directory.

    generate (SL-CAI) → train sft → label (RL-CAI, the SFT model as policy) → train rm
    → train ppo (or dpo) → eval compare (the base model against each trained stage)
    → cai analyze (what each principle did in generate, label and eval), linked from the eval report

Each stage is the same job its own command runs (``cai generate``, ``cai train sft``, ...),
configured from one section of the pipeline config and writing into ``OUT/<stage>``.
``OUT/pipeline.json`` records each stage's config, status, output and time. A rerun runs
every stage again, and each decides by its own rule whether it is done (its folder records
the same identity and all its work): done stages return at once, the stage that stopped
resumes from its own shards or checkpoints.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from core.config import REQUIRED, ConfigError, config_to_dict, load_config, option
from core.hub_datasets import is_hub_source
from core.prompt_data import PromptOptions
from workflows.eval_report import link_analysis
from workflows.plan import check_run_memory
from workflows.runtime.devices import GPU_MEMORY_HELP, GpuMemory, gpu_memory_setting

RECORD = "pipeline.json"
STAGE_DIRS = {"generate": "sl-cai", "sft": "sft", "label": "rl-cai", "rm": "rm", "ppo": "ppo", "dpo": "dpo",
              "eval": "eval"}
ANALYSIS_DIR = "analysis"
ANALYSED_STAGES = ("generate", "label", "eval")


@dataclass(frozen=True)
class PipelineConfig:
    model: str = option(REQUIRED, "base model: a local directory, a hub id, or 'default'")
    constitution: str = option("harmless", "constitution YAML file, or a bundled name")
    prompts: str = option(REQUIRED, "training prompts for SL-CAI generation and RL-CAI labelling (a file, a saved "
                          "dataset directory or hf:ORG/NAME)")
    prompt_source: PromptOptions = option(PromptOptions(), "which split and column of `prompts` generate, label and ppo "
                                          "read (a stage's own section may set them instead)")
    eval_prompts: str = option("", "held-out prompts (with a category column) for the evaluation; empty: no eval")
    out: str = option(REQUIRED, "run directory; each stage writes into its own subdirectory")
    rl: Literal["ppo", "dpo"] = option("ppo", "the RL step: PPO against the reward model, or DPO on the pairs")
    judge: str = option("", "judge model for the evaluation; default: the base model")
    feedback_model: str = option("", "feedback model for RL-CAI labels; default: the base model")
    generate: dict[str, Any] = option({}, "options of `cai generate` (its flag names as keys)")
    sft: dict[str, Any] = option({}, "options of `cai train sft`")
    label: dict[str, Any] = option({}, "options of `cai label`")
    rm: dict[str, Any] = option({}, "options of `cai train rm`")
    ppo: dict[str, Any] = option({}, "options of `cai train ppo`")
    dpo: dict[str, Any] = option({}, "options of `cai train dpo`")
    eval: dict[str, Any] = option({}, "options of `cai eval compare`")
    analyze: dict[str, Any] = option({}, "options of `cai analyze`, which ends the run (e.g. judge: default)")
    gpu_memory_gib: GpuMemory = option("auto", GPU_MEMORY_HELP)

    def __post_init__(self) -> None:
        gpu_memory_setting(self.gpu_memory_gib, "gpu_memory_gib")


@dataclass(frozen=True)
class Stage:
    name: str
    config: Any
    run: Callable[[Any], dict[str, Any]]
    out: Path


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs, dotted keys nested (``generate.revisions=2``), values read as YAML."""
    import yaml

    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. generate.revisions=2")
        *parents, leaf = key.split(".")
        node = overrides
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is set to a value and used as a section")
        node[leaf] = yaml.safe_load(raw)
    return overrides


def load_pipeline_config(path, overrides: list[str], *, base_dir: Path | None = None) -> PipelineConfig:
    """The config of ``cai run``: the YAML file with dotted ``key=value`` overrides on top.
    With ``base_dir``, relative prompt paths are read from there (the demo's own files)."""
    from core.config import read_yaml

    data = merge(read_yaml(path), parse_overrides(overrides))
    if base_dir is not None:
        for key in ("prompts", "eval_prompts"):
            if data.get(key) and not is_hub_source(data[key]) and not Path(data[key]).is_absolute():
                data[key] = str(base_dir / data[key])
    return load_config(PipelineConfig, overrides=data)


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _section(cls, name: str, section: dict[str, Any], fixed: dict[str, Any]):
    """A stage's config: its section of the pipeline config, with the wiring between stages."""
    clash = sorted(set(section) & set(fixed))
    if clash:
        raise ConfigError(f"`{name}.{clash[0]}` is set by the pipeline ({fixed[clash[0]]!r}); remove it from `{name}`")
    try:
        return load_config(cls, overrides={**section, **fixed})
    except ConfigError as exc:
        raise ConfigError(f"in section `{name}`: {exc}") from None


def plan(cfg: PipelineConfig) -> list[Stage]:
    """The stages in order, each with its full config."""
    from workflows.generate import GenerateConfig, run_generate
    from workflows.label import LabelConfig, run_label
    from learners.ppo_config import PPOConfig
    from workflows.ppo import run_ppo
    from learners.hf_configs import DPOConfig, RMConfig, SFTConfig
    from workflows.train import run_train

    root = Path(cfg.out).expanduser().resolve()
    out = {name: root / directory for name, directory in STAGE_DIRS.items()}
    base = cfg.model
    # only when set, so that a stage's section may set them instead (both: "given twice")
    source = {} if cfg.prompt_source == PromptOptions() else {"prompt_source": config_to_dict(cfg.prompt_source)}
    stages = [
        Stage("generate", _section(GenerateConfig, "generate", cfg.generate, dict(
            model=base, constitution=cfg.constitution, prompts=cfg.prompts, **source, out=str(out["generate"]))),
            run_generate, out["generate"]),
        Stage("sft", _section(SFTConfig, "sft", cfg.sft, dict(
            model=base, data=[str(out["generate"])], out=str(out["sft"]))),
            run_train, out["sft"]),
        Stage("label", _section(LabelConfig, "label", cfg.label, dict(
            policy=str(out["sft"]), feedback_model=cfg.feedback_model or base, constitution=cfg.constitution,
            prompts=cfg.prompts, **source, out=str(out["label"]))),
            run_label, out["label"]),
    ]
    if cfg.rl == "ppo":
        stages += [
            # the preference model starts from the base model, as in the paper (not from the SFT policy)
            Stage("rm", _section(RMConfig, "rm", cfg.rm, dict(
                model=base, data=[str(out["label"])], out=str(out["rm"]))),
                run_train, out["rm"]),
            Stage("ppo", _section(PPOConfig, "ppo", cfg.ppo, dict(
                policy=str(out["sft"]), reward_model=str(out["rm"]), prompts=cfg.prompts, **source,
                out=str(out["ppo"]))),
                run_ppo, out["ppo"]),
        ]
    else:
        stages.append(Stage("dpo", _section(DPOConfig, "dpo", cfg.dpo, dict(
            model=str(out["sft"]), data=[str(out["label"])], out=str(out["dpo"]))),
            run_train, out["dpo"]))
    if cfg.eval_prompts:
        from workflows.eval_compare import EvalCompareConfig, run_eval_compare

        challengers = [str(out["sft"]), str(out[cfg.rl])]
        stages.append(Stage("eval", _section(EvalCompareConfig, "eval", cfg.eval, dict(
            model_a=base, model_b=challengers, names=["base", "sft", cfg.rl], judge=cfg.judge or base,
            constitution=cfg.constitution, prompts=cfg.eval_prompts, out=str(out["eval"]))),
            run_eval_compare, out["eval"]))
    return stages


def _read_record(root: Path) -> dict[str, Any]:
    path = root / RECORD
    return json.loads(path.read_text()) if path.exists() else {"stages": {}}


def _write_record(root: Path, record: dict[str, Any]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(root / RECORD)


def run_pipeline(cfg: PipelineConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage not already done; return the record (also in OUT/pipeline.json)."""
    stages = plan(cfg)  # every section is checked before anything runs
    analysis = analysis_config(cfg, stages)
    check_run_memory(cfg.model, stages, log, cfg.gpu_memory_gib)  # and refused here when a stage cannot fit its devices
    root = Path(cfg.out).expanduser().resolve()
    record = _read_record(root)
    record["config"] = config_to_dict(cfg)
    for index, stage in enumerate(stages, 1):
        # Each stage decides for itself whether it is done (its manifest or training summary
        # holds its identity and all its work) and then returns at once, so a rerun continues
        # where the last run stopped and a changed setting reruns (or refuses) that stage.
        log(f"cai run: [{index}/{len(stages)}] {stage.name} → {stage.out}")
        record["stages"][stage.name] = {"status": "running", "out": str(stage.out),
                                        "config": config_to_dict(stage.config), "started_at": time.time()}
        _write_record(root, record)
        started = time.monotonic()
        try:
            summary = stage.run(stage.config)
        except BaseException as exc:
            record["stages"][stage.name].update(status="failed", error=f"{type(exc).__name__}: {exc}"[:1000])
            _write_record(root, record)
            raise
        skipped = bool(summary.get("already_done"))
        if skipped:
            log(f"cai run: [{index}/{len(stages)}] {stage.name}: done already, skipped")
        record["stages"][stage.name].update(status="done", skipped=skipped, seconds=round(time.monotonic() - started, 1),
                                            summary=_brief(summary))
        _write_record(root, record)
    analysed = analyse(analysis, log)
    record["analysis"] = analysed["report"]
    report = root / STAGE_DIRS["eval"] / "report.md"
    if report.exists():
        link_analysis(report, Path(analysed["report"]))
        record["report"] = str(report)
    _write_record(root, record)
    return record


def analysis_config(cfg: PipelineConfig, stages: list[Stage]):
    """The config of the `cai analyze` that ends the run: the generate, label and eval stages,
    into ``OUT/analysis``, with the options of the ``analyze`` section."""
    from workflows.analyze import AnalyzeConfig

    root = Path(cfg.out).expanduser().resolve()
    runs = [str(stage.out) for stage in stages if stage.name in ANALYSED_STAGES]
    return _section(AnalyzeConfig, "analyze", cfg.analyze, dict(runs=runs, out=str(root / ANALYSIS_DIR)))


def analyse(config, log: Callable[[str], None]) -> dict[str, Any]:
    """Run it: a few seconds without a judge (it streams the stages' output). It runs every time,
    so it follows the stages; a judge's stage resumes like any other."""
    from workflows.analyze import run_analyze

    log(f"cai run: analysis of {', '.join(Path(r).name for r in config.runs)} → {config.out}")
    return run_analyze(config)


def _brief(summary: dict[str, Any]) -> dict[str, Any]:
    """The scalar figures of a stage's summary (histories and configs stay in the stage's own files)."""
    keep = {}
    for key, value in summary.items():
        if isinstance(value, (int, float, str, bool)) or value is None:
            keep[key] = value
        elif key == "metrics" and isinstance(value, dict):
            keep[key] = {k: v for k, v in value.items() if isinstance(v, (int, float, str, bool))}
    return keep
