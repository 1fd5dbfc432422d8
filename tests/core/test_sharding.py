"""FSDP2 sharding (``core.sharding``) on the tiny model: two real processes over gloo, no Ray.

One spawn runs every check (start-up costs most of the time): each rank loads the same
model, shards it, gathers it back, takes one AdamW step on the same data and gathers again;
then it runs the PPO learner's own update (``ppo_update`` on a sharded ``ActorCritic``) on
the same rollouts. The ranks write what they saw to a file; the assertions run here, against
models loaded and stepped in this process without any sharding.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
LR = 1e-2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def training_data(vocab_size: int) -> torch.Tensor:
    """The same (2, 16) token ids on every rank and in the single-process reference."""
    return torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))


def load_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def one_step(model) -> None:
    """One AdamW step of the causal-LM loss on :func:`training_data`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    ids = training_data(model.config.vocab_size)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


class PolicyReference:
    """The frozen-models interface over a reference model (the policy, loaded again)."""

    def __init__(self, model_dir: str):
        self.model = load_model(model_dir).eval()

    def ref_logprobs(self, batch, temperature=1.0):
        from core.ppo_policy import sequence_logprobs

        return sequence_logprobs(self.model, batch, temperature)


def ppo_update_once(model_dir: str, wrap, gather) -> dict[str, torch.Tensor] | None:
    """The learner's update (``score_rollouts`` then ``ppo_update``: two optimizer steps of one
    row each, gradients clipped) on two fixed rollouts, the ActorCritic as ``wrap`` returns
    it; then its state as ``gather`` returns it."""
    from core.config import load_config
    from core.ppo_policy import load_actor_critic, pack_rollouts
    from learners.ppo_config import PPOConfig
    from learners.ppo_update import ppo_update, score_rollouts

    cfg = load_config(PPOConfig, overrides=dict(
        policy=model_dir, prompts="p.jsonl", out="o", reward_fn="vowel_share", rollout_batch=2, minibatch=1,
        ppo_epochs=1, steps=1, lr=1e-3, lr_schedule="constant", max_grad_norm=0.1))
    model = wrap(load_actor_critic(model_dir, model_dir))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learner.lr, eps=1e-5)
    batch = pack_rollouts([[5, 6, 7], [8, 9]], [[10, 11, 12, 13], [14, 15]], pad_id=0)
    scored = score_rollouts(model, PolicyReference(model_dir), batch, torch.tensor([0.2, 0.9]), cfg, cfg.kl_coef)
    ppo_update(model, optimizer, batch, scored, cfg, seed=0)
    return gather(model)


BUCKET_BYTES = 256 << 10


def bucket_by_bucket(model, rank: int) -> list[dict[str, torch.Tensor] | None]:
    """What a weight sync sends (#16): the policy gathered one bucket at a time
    (``core.policy_source``, a collective per bucket), as each rank got it."""
    from core.policy_source import PolicySource
    from core.weight_plan import plan_buckets

    source = PolicySource(model, rank=rank)
    return [source.materialize(bucket) for bucket in plan_buckets(source.specs(), BUCKET_BYTES)]


def shard_and_step(rank: int, port: int, model_dir: str, out: str) -> None:
    """One rank: shard, gather, step, gather, then the PPO update on a sharded ActorCritic;
    every gathered state is whole on rank 0 and None on the other rank."""
    import torch.distributed as dist

    from core.sharding import full_state, shard_bytes, shard_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, init_method=f"tcp://127.0.0.1:{port}",
                            timeout=timedelta(seconds=60))
    try:
        model = load_model(model_dir)
        whole = shard_bytes(model)  # before sharding: every parameter, whole
        shard_model(model)
        before = full_state(model, rank=rank)
        one_step(model)
        after = full_state(model, rank=rank)
        buckets = bucket_by_bucket(model, rank)
        stepped = ppo_update_once(model_dir, lambda m: shard_model(m),
                                  lambda m: full_state(m, rank=rank))
        loaded = loaded_from_rank0(model_dir, rank)
        torch.save({"whole_bytes": whole, "shard_bytes": shard_bytes(model), "before": before, "after": after,
                    "ppo": stepped, "buckets": buckets, **loaded}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def loaded_from_rank0(model_dir: str, rank: int) -> dict:
    """The PPO learner's load under FSDP: rank 0 reads the ActorCritic, every rank shards one
    built on `meta` and receives its shards; then the gathered state, the bytes rank 1 ever held
    of weights, and one forward (which needs the rotary buffers)."""
    from core.ppo_policy import load_actor_critic, pack_rollouts
    from core.sharding import full_state, load_from_rank0, shard_bytes, shard_model

    full = load_actor_critic(model_dir, model_dir) if rank == 0 else None
    model = shard_model(load_actor_critic(model_dir, model_dir, on_meta=True))
    assert all(p.device.type == "meta" for p in model.parameters())
    load_from_rank0(model, full, torch.device("cpu"))
    batch = pack_rollouts([[5, 6, 7]], [[10, 11]], pad_id=0)
    with torch.no_grad():
        logprobs = model(batch)[0]
    return {"from_rank0": full_state(model, rank=rank), "from_rank0_bytes": shard_bytes(model),
            "from_rank0_logprobs": logprobs}


@pytest.fixture(scope="module")
def ranks(tiny_model, tmp_path_factory) -> list[dict]:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("sharding")
    with pytest.MonkeyPatch.context() as patch:
        # the ranks unpickle shard_and_step by this module's name, tests.core.test_sharding:
        # pytest (--import-mode=importlib) imports it without the repository root on sys.path,
        # and spawn hands the children the parent's sys.path
        patch.syspath_prepend(str(ROOT))
        mp.spawn(shard_and_step, args=(free_port(), tiny_model, str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


def test_each_rank_holds_about_half_of_the_parameters(ranks):
    for rank, seen in enumerate(ranks):
        share = seen["shard_bytes"] / seen["whole_bytes"]
        assert 0.45 <= share <= 0.6, (f"rank {rank} holds {seen['shard_bytes']} of {seen['whole_bytes']} "
                                      f"parameter bytes ({share:.3f})")
    # together the shards are the whole model (dim-0 chunks, no parameter held twice)
    assert sum(seen["shard_bytes"] for seen in ranks) == ranks[0]["whole_bytes"]


def test_full_state_gathers_the_original_weights_on_rank_0_only(ranks, tiny_model):
    original = load_model(tiny_model).state_dict()
    gathered = ranks[0]["before"]
    assert gathered.keys() == original.keys()
    different = [name for name, tensor in original.items() if not torch.equal(gathered[name], tensor)]
    assert not different, f"gathered weights differ from the loaded ones: {different}"
    assert all(seen["before"] is None and seen["after"] is None and seen["ppo"] is None for seen in ranks[1:])


def test_a_sharded_adamw_step_matches_an_unsharded_one(ranks, tiny_model):
    model = load_model(tiny_model)
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    one_step(model)
    expected, gathered = model.state_dict(), ranks[0]["after"]
    assert gathered.keys() == expected.keys()
    gaps = {name: (gathered[name] - tensor).abs().max().item() for name, tensor in expected.items()}
    worst = max(gaps, key=gaps.get)
    assert gaps[worst] < 1e-5, f"largest gap {gaps[worst]:.2e} in {worst}"
    # the step moved the weights (else matching them would prove nothing)
    assert all(not torch.equal(gathered[name], original[name]) for name in original if name.endswith("proj.weight"))


def test_the_ppo_update_on_shards_matches_the_unsharded_one(ranks, tiny_model):
    """The learner's FSDP path end to end: ActorCritic forward on shards, gradients averaged
    by reduce-scatter, ``clip_grad_norm_`` over DTensor shards (max_grad_norm 0.1: the clip is
    active), two AdamW steps (the second one sees the ratio of the two clipped gradients).
    Both ranks held the same two rollouts, so the advantages were whitened over four rows: the
    unsharded run sums its statistics over two ranks the same way."""
    from core.sharding import full_state

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("learners.ppo_update.all_ranks_sum", lambda tensor: tensor * WORLD)
        expected = ppo_update_once(tiny_model, lambda m: m, full_state)
    gathered = ranks[0]["ppo"]
    assert gathered.keys() == expected.keys()
    gaps = {name: (gathered[name] - tensor).abs().max().item() for name, tensor in expected.items()}
    worst = max(gaps, key=gaps.get)
    assert gaps[worst] < 1e-5, f"largest gap {gaps[worst]:.2e} in {worst}"


def test_a_weight_sync_gathers_one_bucket_at_a_time(ranks, tiny_model):
    """Under FSDP each bucket of the sync plan is gathered by both ranks just before it is
    sent: rank 0 gets exactly the bucket's whole tensors (equal to the gathered model), the
    other rank nothing, and no bucket holds more than the cap unless it is one tensor."""
    from transformers import AutoConfig

    buckets, gathered = ranks[0]["buckets"], ranks[0]["after"]
    assert len(buckets) > 2 and all(bucket is None for bucket in ranks[1]["buckets"])
    sent = {name: tensor for bucket in buckets for name, tensor in bucket.items()}
    tied = AutoConfig.from_pretrained(tiny_model).tie_word_embeddings
    assert sent.keys() == gathered.keys() - ({"lm_head.weight"} if tied else set())
    assert all(torch.equal(sent[name], gathered[name]) for name in sent)
    for bucket in buckets:
        size = sum(t.numel() * t.element_size() for t in bucket.values())
        assert size <= BUCKET_BYTES or len(bucket) == 1, (list(bucket), size)
    assert max(sum(t.numel() * t.element_size() for t in b.values()) for b in buckets) < ranks[0]["whole_bytes"] / 2


def test_rank_0_alone_reads_the_weights_and_every_rank_gets_its_shards(ranks, tiny_model):
    """core.sharding.load_from_rank0: the gathered state is the model rank 0 read, each rank
    holds only its shards, and both ranks compute what the unsharded model computes."""
    from core.ppo_policy import load_actor_critic, pack_rollouts

    whole = load_actor_critic(tiny_model, tiny_model)
    original = whole.state_dict()
    gathered = ranks[0]["from_rank0"]
    assert gathered.keys() == original.keys() and ranks[1]["from_rank0"] is None
    assert all(torch.equal(gathered[name], tensor) for name, tensor in original.items())
    assert ranks[1]["from_rank0_bytes"] <= 0.6 * sum(p.numel() * 4 for p in whole.parameters())
    with torch.no_grad():
        expected = whole(pack_rollouts([[5, 6, 7]], [[10, 11]], pad_id=0))[0]
    for seen in ranks:
        assert torch.allclose(seen["from_rank0_logprobs"], expected, atol=1e-6)
