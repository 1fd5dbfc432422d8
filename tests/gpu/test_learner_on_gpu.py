"""The learner's tensor code on a real GPU: skipped where CUDA is absent (CI has none).

Tiny models, no vLLM and no Ray, so it runs wherever a GPU is: a PPO learner step at T = 0.7,
a reward-model forward and the weights blob the engines load. Run with
``.venv/bin/python -m pytest tests/gpu`` on a GPU machine; docs/gpu.md records where it ran.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")



def test_a_ppo_learner_step_runs_on_the_gpu_and_changes_the_policy(tiny_model):
    from transformers import AutoModelForCausalLM

    from core.config import load_config
    from workflows.ppo import PPOConfig
    from workflows.ppo_learner import learn_from_rollouts
    from core.ppo_policy import load_actor_critic

    cfg = load_config(PPOConfig, overrides=dict(policy=tiny_model, prompts="p.jsonl", out="o", reward_fn="vowel_share",
                                                rollout_batch=4, minibatch=2, ppo_epochs=2, temperature=0.7, lr=1e-3,
                                                steps=2))

    core = load_actor_critic(tiny_model, tiny_model).cuda()
    ref = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).cuda().eval()
    before = {k: v.detach().clone() for k, v in core.policy.named_parameters()}
    optimizer = torch.optim.AdamW(core.parameters(), lr=1e-3, eps=1e-5)
    prompts, responses = [[10, 11, 12], [20, 21], [30], [40, 41, 42, 43]], [[50, 51], [52, 53, 54], [55], [56, 2]]
    batch, scored, stats = learn_from_rollouts(core, core, ref, optimizer, prompts, responses, [0.1, 0.9, 0.5, 0.3],
                                               cfg, 0.05, pad_id=0, seed=0)
    assert batch.input_ids.is_cuda and all(t.is_cuda for t in scored.values())
    assert all(v == v for v in stats.values()), "finite stats"
    changed = [k for k, v in core.policy.named_parameters() if not torch.equal(v, before[k])]
    assert changed, "the policy changed"


def test_reward_model_scores_on_the_gpu_match_the_cpu(tiny_model, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from core.rewards import RewardModelScorer

    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "rm")
    prompts, answers = [[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}]], ["Hello."]
    on_gpu = RewardModelScorer(str(tmp_path / "rm"), device="cuda")(prompts, answers)
    on_cpu = RewardModelScorer(str(tmp_path / "rm"))(prompts, answers)
    assert on_gpu == pytest.approx(on_cpu, abs=1e-3)


def test_the_weights_blob_gathers_gpu_parameters_to_the_host(tiny_model):
    from safetensors.torch import load
    from transformers import AutoModelForCausalLM

    from core.ppo_policy import weights_blob

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).cuda()
    tensors = load(weights_blob(model.state_dict()))
    assert set(tensors) == {name for name, _ in model.named_parameters()}
    assert all(torch.equal(tensors[n], p.detach().cpu()) for n, p in model.named_parameters())


@pytest.fixture
def nccl_group():
    """A one-process NCCL group: FSDP2 on one GPU, as each learner runs it among many."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    yield
    dist.destroy_process_group()


def test_fsdp_on_the_gpu_computes_in_bf16_and_gathers_the_whole_model(tiny_model, nccl_group):
    from transformers import AutoModelForCausalLM

    from core.sharding import full_state, shard_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).cuda()
    before = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    shard_model(model, compute_dtype=torch.bfloat16)
    logits = model(input_ids=torch.tensor([[1, 5, 9, 4]], device="cuda")).logits
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    state = full_state(model, rank=0)
    assert set(state) == set(before) and all(torch.equal(state[k].cpu(), before[k]) for k in before)


def test_frozen_models_in_bf16_on_the_gpu_match_float32(tiny_model):
    from core.frozen_models import FrozenModels
    from core.ppo_policy import pack_rollouts

    batch = pack_rollouts([[10, 11, 12], [20]], [[30, 31], [40, 41, 42]], pad_id=0).to("cuda")
    half = FrozenModels(tiny_model, reward_fn="vowel_share", device="cuda", dtype=torch.bfloat16)
    full = FrozenModels(tiny_model, reward_fn="vowel_share", device="cuda", dtype=torch.float32)
    a, b = half.ref_logprobs(batch, 0.7), full.ref_logprobs(batch, 0.7)
    assert a.dtype == torch.float32 and a.device.type == "cuda"
    assert torch.allclose(a * batch.mask, b * batch.mask, atol=5e-2)
