"""Job configs refuse invalid combinations with messages that name the flags."""

import pytest

from core.config import ConfigError, load_config
from workflows.generate import GenerateConfig
from workflows.label import LabelConfig
from workflows.train import TrainConfig

BASE = dict(constitution="harmless", prompts="p.jsonl", out="o")


def test_generate_config_names_invalid_flags():
    with pytest.raises(ConfigError, match=r"--revisions, --top-p, --shard-size"):
        load_config(GenerateConfig, overrides=dict(model="m", **BASE, revisions=-1, top_p=0.0, shard_size=0))
    with pytest.raises(ConfigError, match="--gpus-per-worker must be at least --tensor-parallel"):
        load_config(GenerateConfig, overrides=dict(model="m", **BASE, gpus_per_worker=1, tensor_parallel=2))


def test_label_config_needs_two_samples_and_consistent_pairs():
    with pytest.raises(ConfigError, match=r"^invalid value for --samples, --max-pairs \(--max-pairs N goes with --pairs random, and only with it\)$"):
        load_config(LabelConfig, overrides=dict(policy="m", **BASE, samples=1, max_pairs=2))
    config = load_config(LabelConfig, overrides=dict(policy="m", **BASE, samples=4, pairs="random", max_pairs=2))
    assert config.max_pairs == 2 and config.pool.shard_size == 64


def test_train_config_names_invalid_flags():
    with pytest.raises(ConfigError, match=r"--eval-split, --beta"):
        load_config(TrainConfig, overrides=dict(model="m", data=["d"], out="o", eval_split=1.5, beta=0))
