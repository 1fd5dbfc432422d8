"""`cai train sft|rm|dpo` as real Ray Train jobs (2 CPU workers, gloo) on the tiny model."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import ray
import torch

from core.config import load_config
from core.training_data import TrainingDataError
from learners.hf_configs import DPOConfig, RMConfig, SFTConfig, TrainJobConfig
from workflows.train import run_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sl_cai_data(ray_local, tiny_model, tmp_path_factory) -> str:
    """SL-CAI data made by `cai generate` in this test session."""
    from workflows.generate import GenerateConfig, run_generate

    root = tmp_path_factory.mktemp("sl-cai")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"How can I be kind to person {i}?"}) + "\n" for i in range(24)))
    run_generate(load_config(GenerateConfig, overrides=dict(
        model=tiny_model, constitution="harmless", prompts=str(prompts), out=str(root / "run"), workers=1,
        max_new_tokens=24, shard_size=12, enforce_eager=True, max_model_len=2048)))
    return str(root / "run")


def train_config(kind, tiny_model, data, out, **training) -> TrainJobConfig:
    values = dict(model=tiny_model, data=[str(d) for d in data], out=str(out), workers=2, batch_size=2,
                  max_length=192, logging_steps=1, save_steps=4, max_steps=8, lr=1e-3)
    values.update(training)
    return load_config({"sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig}[kind], overrides=values)


def checkpoint_copies_since(started: float) -> list[Path]:
    """Folders Ray's ``Checkpoint.to_directory()`` made in the temp dir since ``started``: a copy
    of a whole checkpoint per learner per resume that nothing deleted (the resumes now read it
    through ``as_directory()``)."""
    return [d for d in Path(tempfile.gettempdir()).glob("checkpoint_tmp_*") if d.stat().st_mtime >= started]


def weights_digest(directory) -> str:
    return hashlib.sha256((Path(directory) / "model.safetensors").read_bytes()).hexdigest()


def assert_served_by_vllm(model_dir) -> None:
    from actors.engine import EngineOptions, VLLMEngineHost
    from actors.engine_config import EngineConfig
    from actors.engine_config import EngineConfig
    from core.sampling import SamplingConfig

    host = ray.remote(num_cpus=1)(VLLMEngineHost).remote(
        EngineOptions(model=str(model_dir), config=EngineConfig(max_model_len=1024, enforce_eager=True)))
    try:
        (completion,) = ray.get(host.complete.remote([{"role": "user", "content": "hi"}], SamplingConfig(max_new_tokens=8)))
        assert len(completion.token_ids) > 0
    finally:
        ray.kill(host)


def test_reward_model_learns_a_marker_preference(trained_reward_model):
    """`cai train rm` under FSDP with gradient checkpointing (the session's trained_reward_model,
    also the reward of the LoRA PPO run)."""
    out, summary = Path(trained_reward_model["path"]), trained_reward_model["summary"]
    metrics = summary["metrics"]
    assert summary["precision"]["compute_dtype"] == "bfloat16", "trained in bf16 compute over float32 masters"
    from safetensors.torch import load_file

    assert all(tensor.dtype == torch.float32 for tensor in load_file(out / "model.safetensors").values())
    assert metrics["train_pairwise_accuracy"] >= 0.8
    assert metrics["train_pairwise_accuracy"] > metrics["before_train_pairwise_accuracy"]
    # what `cai train ppo --reward-center` subtracts, read back from the model folder
    from workflows.ppo import reward_model_mean

    assert reward_model_mean(str(out)) == metrics["train_reward_mean"] and metrics["train_reward_std"] > 0
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1


def test_dpo_trains_on_sl_cai_pairs(tiny_model, sl_cai_data, tmp_path):
    # SL-CAI rows are DPO-ready (chosen: the final revision, rejected: the initial answer);
    # the RL-CAI labels reach a trainer in the pipeline test (label -> rm)
    # with LoRA adapters on two projections, over FSDP2 shards: the saved model is merged
    out = tmp_path / "dpo"
    summary = run_train(train_config("dpo", tiny_model, [sl_cai_data], out, max_steps=4, strategy="fsdp",
                                     lora_r=8, lora_alpha=16, lora_targets=["q_proj", "v_proj"],
                                     compute_dtype="bfloat16"))
    assert summary["metrics"]["global_step"] == 4
    assert summary["precision"] == {"compute_dtype": "bfloat16", "master_dtype": "float32",
                                    "forward": "every parameter cast to the compute dtype"}
    from safetensors.torch import load_file

    base, merged = load_file(Path(tiny_model) / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(tensor.dtype == torch.float32 for tensor in merged.values()), "float32 masters, saved as they are"
    assert set(merged) == set(base), "an ordinary model: the base model's names, no adapter weights"
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    assert changed and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in changed), changed
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size > 0
    assert_served_by_vllm(out)


def test_sft_in_bf16_at_lr_1e_5_moves_its_float32_weights(tiny_model, sl_cai_data, tmp_path):
    """--compute-dtype bfloat16 (DDP, autocast over float32 masters): two optimizer steps at lr
    1e-5 change the weights; bf16 weights would keep most of them (tests/core/test_precision.py)."""
    from safetensors.torch import load_file

    out = tmp_path / "sft-bf16"
    summary = run_train(train_config("sft", tiny_model, [sl_cai_data], out, workers=1, max_steps=2, lr=1e-5,
                                     compute_dtype="bfloat16"))
    assert summary["precision"]["compute_dtype"] == "bfloat16" and summary["precision"]["master_dtype"] == "float32"
    base, trained = load_file(Path(tiny_model) / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(tensor.dtype == torch.float32 for tensor in trained.values())
    changed = [name for name in base if not torch.equal(base[name], trained[name])]
    assert len(changed) >= 0.9 * len(base), f"only {len(changed)} of {len(base)} tensors moved"


def test_bad_data_fails_before_any_worker(tiny_model, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    with pytest.raises(TrainingDataError, match=r"missing column\(s\) \['rejected'\]"):
        run_train(train_config("dpo", tiny_model, [rows], tmp_path / "x"))
    rows.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "chosen_prob": 1.5}) + "\n")
    with pytest.raises(TrainingDataError, match=r"chosen_prob outside \[0, 1\]"):
        run_train(train_config("rm", tiny_model, [rows], tmp_path / "x"))
    with pytest.raises(TrainingDataError, match="does not exist"):
        run_train(train_config("sft", tiny_model, [tmp_path / "nothing"], tmp_path / "x"))


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(what)


def registered_step(storage: Path) -> int | None:
    """The step of the latest checkpoint Ray Train has registered (its controller rewrites
    checkpoint_manager_snapshot.json at each registration), or None."""
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
            if latest:
                state = snapshot.parent / latest["checkpoint_dir_name"] / "checkpoint" / "trainer_state.json"
                return json.loads(state.read_text())["global_step"]
        except (OSError, ValueError, KeyError):  # being written
            continue
    return None


def held_at(storage: Path, step: int, ranks: int = 2) -> bool:
    """Every rank is holding after ``step`` and the controller has registered that checkpoint."""
    return len(list(storage.glob("*/workers/held-rank-*"))) == ranks and registered_step(storage) == step


def kill_workers(storage: Path) -> None:
    for rank in storage.glob("*/workers/rank-*.json"):
        try:
            os.kill(json.loads(rank.read_text())["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def drilled_sft(tiny_model, sl_cai_data, tmp_path_factory):
    """One SFT job under FSDP whose rank-1 worker is killed while the workers hold after
    checkpoint 8: the restart resumes from sharded (DCP) checkpoints, each rank's shard written
    into the same Ray Train checkpoint."""
    root = tmp_path_factory.mktemp("drill")
    storage = root / "storage"
    # every worker holds once after checkpoint 8 (the fault drill): the kill lands at a known step
    config = train_config("sft", tiny_model, [sl_cai_data], root / "a" / "sft", max_steps=16, save_steps=4,
                          max_failures=1, storage_path=str(storage), hold_at_step=8, strategy="fsdp")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run_train(config)))
    thread.start()
    try:
        wait_for(lambda: held_at(storage, 8), 300, "the workers never held at step 8")
        rank1 = json.loads(next(storage.glob("*/workers/rank-1.json")).read_text())
        os.kill(rank1["pid"], signal.SIGKILL)
        thread.join(timeout=600)
    finally:
        if thread.is_alive():
            kill_workers(storage)
    return {"result": result, "root": root, "storage": storage}


@pytest.mark.fault
def test_killed_worker_restarts_from_the_last_checkpoint(drilled_sft):
    result = drilled_sft["result"]
    assert result, "the job finished after the restart"
    assert result["metrics"]["global_step"] == 16
    assert result["metrics"]["resumed_from_step"] == 8, "the restarted workers resumed from checkpoint 8"
    rows = [json.loads(line) for line in (drilled_sft["root"] / "a" / "sft" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps and steps == sorted(set(steps)), f"each logged step once, in order, across the restart: {steps}"
    assert steps[-1] > 8, "steps after the restart were logged"


def test_sft_under_fsdp_learns_through_the_restart(drilled_sft, tiny_model):
    """The drilled job is also the SFT test: FSDP2 over 2 workers (accelerate's plugin, gloo) on
    SL-CAI data; the loss falls, the parameters change, the live log has a row per step. (vLLM
    serves an FSDP-saved model in test_dpo_trains_on_sl_cai_pairs and the pipeline test.)"""
    result, out = drilled_sft["result"], drilled_sft["root"] / "a" / "sft"
    assert result["config"]["learner"]["strategy"] == "fsdp"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) >= 10 and all(l == l and abs(l) < 1e4 for l in losses), "finite losses"
    assert losses[-1] < losses[0]
    assert all(r["learning_rate"] > 0 and r["epoch"] > 0 and r["tokens_per_second"] > 0 for r in rows)
    assert weights_digest(out) != weights_digest(tiny_model), "the parameters changed"
    saved = json.loads((out / "training_summary.json").read_text())
    assert saved["data"][0]["stage"] == "generate" and saved["config"]["model"] == tiny_model


@pytest.mark.fault
def test_two_jobs_sharing_a_storage_path_never_share_checkpoints(tiny_model, sl_cai_data, drilled_sft):
    first = drilled_sft["result"]
    # the same folder name (``sft``) under another parent, into the storage that holds the first job
    second = run_train(train_config("sft", tiny_model, [sl_cai_data], drilled_sft["root"] / "b" / "sft", workers=1,
                                           max_steps=2, save_steps=1, storage_path=str(drilled_sft["storage"])))
    assert first["ray_train"]["name"] != second["ray_train"]["name"]
    assert second["metrics"]["resumed_from_step"] == 0 and second["metrics"]["global_step"] == 2
    assert first["run_id"].startswith("sft-") and first["run_id"] in first["ray_train"]["name"]


@pytest.mark.fault
def test_rerun_continues_from_the_checkpoint_step(tiny_model, sl_cai_data, ray_local, tmp_path):
    out = tmp_path / "sft-resume"
    storage = tmp_path / "storage"
    argv = [sys.executable, "-m", "workflows.cli", "train", "sft", "--model", tiny_model, "--data", sl_cai_data,
            "--out", str(out), "--workers", "2", "--batch-size", "2", "--max-length", "192", "--max-steps", "16",
            "--save-steps", "4", "--logging-steps", "1", "--lr", "1e-3", "--storage-path", str(storage)]
    first = subprocess.Popen([*argv, "--hold-at-step", "12"], env={**os.environ, "RAY_ADDRESS": ray_local["address"]},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: held_at(storage, 12), 300, "the workers never held at step 12")
    finally:
        # stop the job: the driver, and the (holding) training workers it owns
        first.send_signal(signal.SIGKILL)
        first.wait()
        kill_workers(storage)
    assert not (out / "training_summary.json").exists(), "stopped part-way"
    started = time.time()
    summary = run_train(train_config("sft", tiny_model, [sl_cai_data], out, max_steps=16, save_steps=4,
                                            storage_path=str(storage)))
    assert summary["metrics"]["resumed_from_step"] == 12, "continued from the checkpoint's step, not from scratch"
    assert summary["metrics"]["global_step"] == 16
    assert not checkpoint_copies_since(started), "the learners read the checkpoint in place and left no copy"


def test_sl_cai_rows_give_one_sft_example_per_revision_round(tmp_path):
    """§3.1 fine-tunes on the revisions of every round: R rounds, R examples per prompt."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from learners.hf_trainers import sft_data

    run = tmp_path / "sl-cai" / "data"
    run.mkdir(parents=True)
    prompt = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "How do I pick a lock?"}]
    rows = [{"prompt": prompt, "messages": [*prompt, {"role": "assistant", "content": f"r{i}-3"}],
             "revisions": [{"round": k, "principle_id": "p", "critique": "c", "revision": f"r{i}-{k}"}
                           for k in (1, 2, 3)]} for i in range(2)]
    pq.write_table(pa.Table.from_pylist(rows), run / "shard-00000.parquet")
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello"}]}) + "\n")

    every = sft_data([str(run.parent), str(plain)], "all")["messages"]
    assert [m[-1]["content"] for m in every] == ["r0-1", "r0-2", "r0-3", "r1-1", "r1-2", "r1-3", "hello"]
    assert all(m[:2] == prompt for m in every[:6]), "each example keeps the whole prompt"
    final = sft_data([str(run.parent), str(plain)], "final")["messages"]
    assert [m[-1]["content"] for m in final] == ["r0-3", "r1-3", "hello"]
