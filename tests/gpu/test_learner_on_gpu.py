"""The learners' tensor code on a real GPU, in bf16: `bash tests/gpu/run.sh` (docs/gpu.md).

Tiny models; torch, transformers, accelerate and peft only (no vLLM, Ray or TRL), so it runs on a
bare CUDA machine. Skipped where CUDA is absent (CI has none); ``CAI_GPU_TIER_DEVICE=cpu`` runs
every check that does not need CUDA on the CPU instead, in bf16 too, to check the tier itself.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

DEVICE = os.environ.get("CAI_GPU_TIER_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
pytestmark = pytest.mark.skipif(not DEVICE, reason="needs a CUDA GPU (or CAI_GPU_TIER_DEVICE=cpu)")
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="CUDA only")


def ppo_config(tiny_model, **values):
    from core.config import load_config
    from learners.ppo_config import PPOConfig

    return load_config(PPOConfig, overrides=dict(
        policy=tiny_model, prompts="p.jsonl", out="o", reward_fn="vowel_share", rollout_batch=4, minibatch=2,
        ppo_epochs=2, temperature=0.7, lr=1e-3, steps=2, **values))


def test_a_bf16_ppo_learner_step_starts_at_kl_0_and_steps_float32_masters(tiny_model):
    """The PPO learner as `--compute-dtype bfloat16 --frozen-dtype bfloat16` runs it: every
    parameter cast for the forward, the reference stored in bf16, so the KL before the update
    is 0; the float32 masters change."""
    from core.frozen_models import FrozenModels
    from core.ppo_policy import load_actor_critic
    from learners.ppo_update import learn_from_rollouts

    cfg = ppo_config(tiny_model, compute_dtype="bfloat16", frozen_dtype="bfloat16")
    core = load_actor_critic(tiny_model, tiny_model).to(DEVICE)
    core.compute_dtype = torch.bfloat16
    frozen = FrozenModels(tiny_model, reward_fn="vowel_share", device=DEVICE, dtype=torch.bfloat16)
    before = {k: v.detach().clone() for k, v in core.policy.named_parameters()}
    optimizer = torch.optim.AdamW(core.parameters(), lr=1e-3, eps=1e-5)
    prompts, responses = [[10, 11, 12], [20, 21], [30], [40, 41, 42, 43]], [[50, 51], [52, 53, 54], [55], [56, 2]]
    batch, scored, stats = learn_from_rollouts(core, core, frozen, optimizer, prompts, responses, [0.1, 0.9, 0.5, 0.3],
                                               cfg, 0.05, pad_id=0, seed=0)
    assert batch.input_ids.device.type == DEVICE and all(t.device.type == DEVICE for t in scored.values())
    assert (scored["kl"] * batch.mask).abs().max().item() <= 1e-6, "the same computation as the reference"
    assert all(v == v for v in stats.values()), "finite stats"
    assert all(p.dtype == torch.float32 for p in core.parameters())
    assert [k for k, v in core.policy.named_parameters() if not torch.equal(v, before[k])], "the policy changed"


@pytest.fixture
def one_process_group():
    """A one-process group (NCCL on CUDA, gloo on the CPU): FSDP2 as each learner runs it."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if DEVICE == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", rank=0, world_size=1,
                            init_method=f"tcp://127.0.0.1:{port}")
    yield
    dist.destroy_process_group()


def test_fsdp_computes_in_bf16_over_float32_shards_and_gathers_the_whole_model(tiny_model, one_process_group):
    from transformers import AutoModelForCausalLM

    from core.sharding import full_state, shard_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).to(DEVICE)
    before = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    shard_model(model, compute_dtype=torch.bfloat16)
    logits = model(input_ids=torch.tensor([[1, 5, 9, 4]], device=DEVICE)).logits
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    state = full_state(model, rank=0)
    assert set(state) == set(before) and all(torch.equal(state[k].cpu(), before[k]) for k in before)


def _causal_lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def test_sft_rm_and_dpo_steps_at_lr_1e_5_change_float32_masters_and_pure_bf16_loses_them(tiny_model):
    """One optimizer step of each loss the trainers run (SFT's causal-LM loss, the RM's soft
    Bradley-Terry loss, DPO's sigmoid loss), bf16 compute over float32 masters at lr 1e-5:
    every step moves the weights. The same SFT step on bf16 weights (pure bf16) leaves most of
    them where they were."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from core.losses import soft_preference_loss

    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    chosen, rejected = ids[:1], ids[1:]

    def step(model, loss_fn) -> float:
        """One AdamW step at lr 1e-5 in bf16 compute; the share of weights it moved."""
        before = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss_fn(model).backward()
        optimizer.step()
        moved = sum((p.detach() != b).sum().item() for p, b in zip(model.parameters(), before))
        return moved / sum(b.numel() for b in before)

    sft = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).to(DEVICE)
    assert step(sft, lambda m: _causal_lm_loss(m, ids)) > 0.9

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1, dtype=torch.float32).to(DEVICE)
    rm.config.pad_token_id = 0

    def rm_loss(model):
        scores = model(input_ids=ids).logits.squeeze(-1).float()
        return soft_preference_loss(scores[:1], scores[1:], torch.tensor([0.9], device=DEVICE))

    assert step(rm, rm_loss) > 0.9

    policy = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).to(DEVICE)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).to(DEVICE).eval()

    def sequence_logprob(model, seq):
        logits = model(input_ids=seq).logits[:, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, seq[:, 1:, None]).sum()

    def dpo_loss(model):
        with torch.no_grad():
            ref = sequence_logprob(reference, chosen) - sequence_logprob(reference, rejected)
        return -F.logsigmoid(0.1 * (sequence_logprob(model, chosen) - sequence_logprob(model, rejected) - ref))

    assert step(policy, dpo_loss) > 0.9

    pure = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).to(DEVICE)
    assert step(pure, lambda m: _causal_lm_loss(m, ids)) < 0.5, "pure bf16 loses most updates at lr 1e-5"


def test_frozen_models_in_bf16_match_float32(tiny_model):
    from core.frozen_models import FrozenModels
    from core.ppo_policy import pack_rollouts

    batch = pack_rollouts([[10, 11, 12], [20]], [[30, 31], [40, 41, 42]], pad_id=0).to(DEVICE)
    half = FrozenModels(tiny_model, reward_fn="vowel_share", device=DEVICE, dtype=torch.bfloat16)
    full = FrozenModels(tiny_model, reward_fn="vowel_share", device=DEVICE, dtype=torch.float32)
    a, b = half.ref_logprobs(batch, 0.7), full.ref_logprobs(batch, 0.7)
    assert a.dtype == torch.float32 and a.device.type == DEVICE
    assert torch.allclose(a * batch.mask, b * batch.mask, atol=5e-2)


def test_reward_model_scores_on_the_device_match_the_cpu(tiny_model, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from core.rewards import RewardModelScorer

    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "rm")
    prompts, answers = [[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}]], ["Hello."]
    on_device = RewardModelScorer(str(tmp_path / "rm"), device=DEVICE)(prompts, answers)
    on_cpu = RewardModelScorer(str(tmp_path / "rm"))(prompts, answers)
    assert on_device == pytest.approx(on_cpu, abs=1e-3)


@needs_cuda
def test_a_stream_that_never_finishes_ends_in_transport_error_within_the_timeout():
    """The NCCL channel's wait (actors.broadcast_group.EventDone) on a real CUDA stream busy far
    past the deadline (torch.cuda._sleep, a private spin kernel PyTorch's own tests use, 2.13):
    TransportError within the timeout, and the abort called."""
    from actors.broadcast_group import EventDone, TransportError

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(int(5e10))  # tens of seconds of spinning on any current GPU
    event = torch.cuda.Event()
    event.record(stream)
    aborted = []
    started = time.monotonic()
    with pytest.raises(TransportError, match="did not finish within --sync-timeout 1 s"):
        EventDone(event, 1.0, lambda: aborted.append(True), what="a stalled broadcast").wait()
    assert time.monotonic() - started < 3 and aborted == [True]
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream())
    assert EventDone(done, 5.0, lambda: None).wait(), "a finished stream passes"


def test_the_behaviour_weights_remove_the_gap_of_a_bf16_sampler_from_a_float32_learner(tiny_model):
    """What a bf16 vLLM engine on a GPU does to PPO's numbers, with the policy in bf16 standing in
    for the engine: over the whole vocabulary at each position, E_behaviour[w·A] equals the
    float32 learner's E_proximal[A] (w: core.ppo_math.truncated_is_weights), E_behaviour[A] does not."""
    from transformers import AutoModelForCausalLM

    from core.ppo_math import truncated_is_weights

    ids = torch.tensor([[1, 17, 45, 99, 230, 12, 7, 300, 64, 5]], device=DEVICE)

    def logprobs(dtype):
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype).to(DEVICE).eval()
        with torch.no_grad():
            return torch.log_softmax(model(ids).logits[0].float() / 0.7, dim=-1).double()

    proximal, behaviour = logprobs(torch.float32), logprobs(torch.bfloat16)
    advantages = torch.randn(proximal.shape, generator=torch.Generator().manual_seed(0)).double().to(DEVICE)
    weights, _ = truncated_is_weights(proximal, behaviour, torch.ones_like(proximal), cap=2.0)
    target = (proximal.exp() * advantages).sum(-1)
    assert ((behaviour.exp() * advantages).sum(-1) - target).abs().max() > 1e-5
    assert ((behaviour.exp() * weights * advantages).sum(-1) - target).abs().max() < 1e-6
