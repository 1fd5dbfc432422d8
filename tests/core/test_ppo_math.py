"""PPO math against values worked out by hand on 1–6 token tensors (see the comments)."""

import math

import pytest
import torch
from torch.testing import assert_close

from core.ppo_math import (
    truncated_is_weights,
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae_advantages,
    kl_per_token,
    learning_rate,
    logprobs_from_logits,
    mask_after_eos,
    masked_mean,
    masked_var,
    masked_whiten,
    penalize_missing_eos,
    policy_loss,
    response_mask,
    shaped_rewards,
    value_loss,
)


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_masked_mean_and_var_ignore_padding_even_when_it_is_inf_or_nan():
    x = t([[1.0, 2.0, math.inf], [4.0, math.nan, 6.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    # kept entries 1, 2, 4: mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9
    assert masked_mean(x, mask).item() == pytest.approx(7 / 3)
    assert_close(masked_mean(x, mask, dim=1), t([1.5, 4.0]))
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(14 / 9)
    assert masked_var(x, mask).item() == pytest.approx(7 / 3)
    # an empty row averages to 0, not NaN
    assert_close(masked_mean(x, t([[1, 1, 0], [0, 0, 0]]), dim=1), t([1.5, 0.0]))
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, t([[1, 0, 0], [0, 0, 0]]))


def test_whiten_gives_zero_mean_unit_variance_over_mask_and_zeros_outside():
    x = t([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    # kept 1, 2, 3, 4: mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    std = math.sqrt(5 / 3)
    whitened = masked_whiten(x, mask)
    assert_close(whitened, t([[-1.5, -0.5, 0.5], [1.5, 0.0, 0.0]]) / std)
    assert masked_mean(whitened, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(whitened, mask).item() == pytest.approx(1.0, rel=1e-6)
    unshifted = masked_whiten(x, mask, shift_mean=False)
    assert_close(unshifted, (t([[-1.5, -0.5, 0.5], [1.5, 0.0, 0.0]]) / std + 2.5) * mask)


def trl_masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """TRL's masked_whiten (trl/core.py up to 0.11, then trl/trainer/utils.py), verbatim in effect."""
    mean = (values * mask).sum() / mask.sum()
    variance = (((values - mean) ** 2) * mask).sum() / mask.sum()
    variance = variance * mask.sum() / (mask.sum() - 1)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return whitened + mean if not shift_mean else whitened


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_trl_on_hand_made_batches(shift_mean):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=generator) * 3 + 1
    mask = response_mask(torch.tensor([7, 3, 1, 5]), 7)
    ours, trl = masked_whiten(x, mask, shift_mean), trl_masked_whiten(x, mask, shift_mean)
    assert_close(ours, trl * mask, rtol=1e-5, atol=1e-6)


def test_whiten_with_one_token_centres_instead_of_dividing_by_zero():
    one = masked_whiten(t([[2.5, 7.0]]), t([[1, 0]]))
    assert_close(one, t([[0.0, 0.0]]))  # TRL gives NaN here (n - 1 = 0)
    assert_close(masked_whiten(t([[2.5, 7.0]]), t([[1, 0]]), shift_mean=False), t([[2.5, 0.0]]))
    assert_close(masked_whiten(t([[2.5, 7.0]]), t([[0, 0]])), t([[0.0, 0.0]]))


def _whiten_on_rank(rank: int, init: str, parts: list, masks: list, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        def all_ranks_sum(tensor: torch.Tensor) -> torch.Tensor:
            tensor = tensor.clone()
            dist.all_reduce(tensor)
            return tensor

        torch.save(masked_whiten(parts[rank], masks[rank], all_ranks_sum=all_ranks_sum), f"{out}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_whitening_over_two_learners_is_the_whole_batch_and_a_one_token_rank_is_fine(tmp_path):
    """Two gloo ranks: rank 1 holds a single one-token answer. Each rank's whitened advantages
    equal the whole batch's, whitened in one place."""
    import torch.multiprocessing as mp

    parts = [t([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]]), t([[9.0, 0.0, 0.0]])]
    masks = [t([[1, 1, 1], [1, 1, 0]]), t([[1, 0, 0]])]
    mp.spawn(_whiten_on_rank, args=(f"file://{tmp_path / 'rendezvous'}", parts, masks, str(tmp_path / "w")), nprocs=2)
    whole = masked_whiten(torch.cat(parts), torch.cat(masks))
    assert_close(torch.load(tmp_path / "w-0.pt"), whole[:2])
    assert_close(torch.load(tmp_path / "w-1.pt"), whole[2:])
    assert torch.load(tmp_path / "w-1.pt")[0, 0] > 1.0, "the lone token is scaled by the batch's spread"


def test_response_mask_and_mask_after_eos():
    assert_close(response_mask(torch.tensor([2, 0, 3]), 3), t([[1, 1, 0], [0, 0, 0], [1, 1, 1]]))
    eos = 2
    tokens = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0]])
    # up to and including the first EOS; a row without EOS keeps everything
    assert_close(mask_after_eos(tokens, eos), t([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]))


def test_logprobs_and_entropy_on_a_two_token_vocabulary():
    # logits (ln 3, 0) -> p = (3/4, 1/4); logits (0, 0) -> p = (1/2, 1/2); (0, -inf) -> (1, 0)
    logits = t([[[math.log(3.0), 0.0], [0.0, 0.0], [0.0, -math.inf]]])
    tokens = torch.tensor([[0, 1, 0]])
    assert_close(logprobs_from_logits(logits, tokens), t([[math.log(0.75), math.log(0.5), 0.0]]))
    h_quarter = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert_close(entropy_from_logits(logits), t([[h_quarter, math.log(2.0), 0.0]]))


def test_kl_estimators_by_hand():
    logprobs, ref = t([[-1.0, -2.0, -0.5]]), t([[-2.0, -1.0, -0.5]])
    # d = logprobs - ref = (1, -1, 0); k3 with r = exp(-d): (r - 1) - ln r = r - 1 + d
    assert_close(kl_per_token(logprobs, ref, "k1"), t([[1.0, -1.0, 0.0]]))
    assert_close(kl_per_token(logprobs, ref, "abs"), t([[1.0, 1.0, 0.0]]))
    assert_close(kl_per_token(logprobs, ref, "mse"), t([[0.5, 0.5, 0.0]]))
    assert_close(kl_per_token(logprobs, ref, "k3"), t([[math.exp(-1.0), math.e - 2.0, 0.0]]))
    with pytest.raises(ValueError, match="'k2'"):
        kl_per_token(logprobs, ref, "k2")


def test_shaped_rewards_put_the_score_on_the_last_real_token():
    logprobs = t([[0.5, 1.0, -0.5], [2.0, 0.25, 9.0], [3.0, 3.0, 3.0]])
    ref = torch.zeros(3, 3)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    rewards, kl = shaped_rewards(t([10.0, 20.0, 30.0]), logprobs, ref, mask, kl_coef=0.1)
    assert_close(kl, t([[0.5, 1.0, -0.5], [2.0, 0.25, 0.0], [0.0, 0.0, 0.0]]))
    # -0.1 * kl everywhere real; + score on the last real token; the empty row drops its 30
    expected = t([[-0.05, -0.1, 0.05 + 10.0], [-0.2, -0.025 + 20.0, 0.0], [0.0, 0.0, 0.0]])
    assert_close(rewards, expected)


REWARDS = t([[1.0, 2.0, 3.0], [1.0, 2.0, 99.0]])
VALUES = t([[0.5, 1.0, 1.5], [0.5, 1.0, 7.0]])
GAE_MASK = t([[1, 1, 1], [1, 1, 0]])  # row 1 is padded: its 99 and 7.0 must not count


def test_gae_with_gamma_and_lambda_one_is_return_to_go_minus_value():
    advantages, returns = gae_advantages(REWARDS, VALUES, GAE_MASK, gamma=1.0, lam=1.0)
    # row 0: returns-to-go 1+2+3, 2+3, 3 = (6, 5, 3); minus values -> (5.5, 4.0, 1.5)
    # row 1: returns-to-go 1+2, 2 = (3, 2); minus values -> (2.5, 1.0); padding 0
    assert_close(returns, t([[6.0, 5.0, 3.0], [3.0, 2.0, 0.0]]))
    assert_close(advantages, t([[5.5, 4.0, 1.5], [2.5, 1.0, 0.0]]))


def test_gae_with_half_discount():
    advantages, returns = gae_advantages(REWARDS, VALUES, GAE_MASK, gamma=0.5, lam=0.5)
    # row 0, gamma*lam = 0.25, value after the last token 0:
    #   t=2: delta = 3 - 1.5 = 1.5                      A = 1.5
    #   t=1: delta = 2 + 0.5*1.5 - 1.0 = 1.75           A = 1.75 + 0.25*1.5 = 2.125
    #   t=0: delta = 1 + 0.5*1.0 - 0.5 = 1.0            A = 1.0 + 0.25*2.125 = 1.53125
    # row 1 ends at t=1:
    #   t=1: delta = 2 - 1.0 = 1.0                      A = 1.0
    #   t=0: delta = 1 + 0.5*1.0 - 0.5 = 1.0            A = 1.0 + 0.25*1.0 = 1.25
    assert_close(advantages, t([[1.53125, 2.125, 1.5], [1.25, 1.0, 0.0]]))
    assert_close(returns, t([[2.03125, 3.125, 3.0], [1.75, 2.0, 0.0]]))


@pytest.mark.parametrize(
    ("advantage", "ratio", "loss", "clipfrac"),
    [
        (1.0, 1.5, -1.2, 1.0),  # A > 0, ratio above 1 + eps: -A * 1.2 wins over -A * 1.5
        (1.0, 0.5, -0.5, 0.0),  # A > 0, ratio below 1 - eps: -0.5 > -0.8, unclipped wins
        (-1.0, 0.5, 0.8, 1.0),  # A < 0, ratio below 1 - eps: 0.8 > 0.5, clipped wins
        (-1.0, 1.5, 1.5, 0.0),  # A < 0, ratio above 1 + eps: 1.5 > 1.2, unclipped wins
        (2.0, 1.1, -2.2, 0.0),  # inside the clip range: -2 * 1.1
        (-2.0, 0.9, 1.8, 0.0),  # inside the clip range: 2 * 0.9
    ],
)
def test_policy_loss_clipped_and_unclipped_regimes(advantage, ratio, loss, clipfrac):
    got, stats = policy_loss(t([[math.log(ratio)]]), t([[0.0]]), t([[advantage]]), t([[1]]), clip_range=0.2)
    assert got.item() == pytest.approx(loss, abs=1e-6)
    assert stats["clipfrac"] == clipfrac
    assert stats["ratio_mean"] == pytest.approx(ratio, abs=1e-6)
    assert stats["approx_kl"] == pytest.approx(0.5 * math.log(ratio) ** 2, abs=1e-6)


def test_policy_loss_averages_over_the_mask_and_ignores_padding():
    # the five cases above in one row, then a padding token whose ratio e^100 overflows float32
    ratios = [1.5, 0.5, 0.5, 1.5, 1.1]
    logprobs = t([[*map(math.log, ratios), 100.0]]).requires_grad_()
    advantages = t([[1.0, 1.0, -1.0, -1.0, 2.0, 5.0]])
    loss, stats = policy_loss(logprobs, torch.zeros(1, 6), advantages, t([[1, 1, 1, 1, 1, 0]]), 0.2)
    # (-1.2 - 0.5 + 0.8 + 1.5 - 2.2) / 5 = -0.32; clipped on tokens 0 and 2 -> 2/5
    assert loss.item() == pytest.approx(-0.32, abs=1e-6)
    assert stats["clipfrac"] == pytest.approx(0.4)
    assert stats["ratio_mean"] == pytest.approx(5.1 / 5, abs=1e-6)
    squares = 2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2 + math.log(1.1) ** 2
    assert stats["approx_kl"] == pytest.approx(0.5 * squares / 5, abs=1e-6)
    loss.backward()
    assert torch.isfinite(logprobs.grad).all() and logprobs.grad[0, 5] == 0


def test_policy_gradient_is_zero_where_the_clip_binds():
    logprobs = t([[math.log(1.5), math.log(0.5), math.log(0.5), math.log(1.1)]]).requires_grad_()
    advantages = t([[1.0, -1.0, 1.0, 1.0]])
    loss, _ = policy_loss(logprobs, torch.zeros(1, 4), advantages, torch.ones(1, 4), clip_range=0.2)
    loss.backward()
    # tokens 0 (A > 0, ratio 1.5) and 1 (A < 0, ratio 0.5) are clipped on the side that matters.
    # Elsewhere d/dlp of -A * e^lp / 4 is -A * ratio / 4: -0.5/4 and -1.1/4.
    assert_close(logprobs.grad, t([[0.0, 0.0, -0.125, -0.275]]))


@pytest.mark.parametrize(
    ("value", "old", "target", "loss", "clipfrac", "error"),
    [
        (1.5, 1.0, 2.0, 0.32, 1.0, 0.25),  # V clipped to 1.2: (1.2-2)^2 = 0.64 > 0.25
        (1.5, 1.0, 1.0, 0.125, 0.0, 0.25),  # V clipped to 1.2: (1.2-1)^2 = 0.04 < 0.25
        (1.1, 1.0, 2.0, 0.405, 0.0, 0.81),  # inside the range: 0.81 / 2
        (0.5, 1.0, 0.0, 0.32, 1.0, 0.25),  # V clipped to 0.8: 0.64 > 0.25
    ],
)
def test_value_loss_clipped_and_unclipped_regimes(value, old, target, loss, clipfrac, error):
    # a second, padded token with wild values must not count
    values, old_values, returns = t([[value, 50.0]]), t([[old, 0.0]]), t([[target, -50.0]])
    got, stats = value_loss(values, old_values, returns, t([[1, 0]]), clip_range_value=0.2)
    assert got.item() == pytest.approx(loss, abs=1e-6)
    assert stats["vf_clipfrac"] == clipfrac
    assert stats["value_error"] == pytest.approx(error, abs=1e-6)


@pytest.mark.parametrize(
    ("current_kl", "expected"),
    [
        (9.0, 0.2 * (1 + 0.2 * 256 / 10_000)),  # 9/6 - 1 = 0.5, clipped to 0.2: x 1.00512
        (5.4, 0.2 * (1 - 0.1 * 256 / 10_000)),  # 5.4/6 - 1 = -0.1: x 0.99744
        (0.0, 0.2 * (1 - 0.2 * 256 / 10_000)),  # -1 clipped to -0.2: x 0.99488
        (6.0, 0.2),  # on target: unchanged
    ],
)
def test_adaptive_kl_controller_moves_toward_target(current_kl, expected):
    controller = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    controller.update(current_kl, n_steps=256)
    assert controller.value == pytest.approx(expected, rel=1e-12)


def test_fixed_kl_controller_and_invalid_adaptive_settings():
    fixed = FixedKLController(0.05)
    fixed.update(100.0, n_steps=256)
    assert fixed.value == 0.05
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.2, target=0.0, horizon=10_000)


def test_an_answer_without_eos_loses_the_penalty_from_its_own_score_as_in_trl():
    # TRL: rewards[~contain_eos_token] -= missing_eos_penalty
    scores, finished = [0.9, -3.0, 0.7, -2.5], [True, False, True, False]
    trl = torch.tensor(scores)
    trl[~torch.tensor(finished)] -= 1.0
    assert penalize_missing_eos(scores, finished, 1.0) == pytest.approx(trl.tolist())
    assert penalize_missing_eos(scores, finished, 1.0) == pytest.approx([0.9, -4.0, 0.7, -3.5])
    # a reward model whose scores sit below -1 no longer prefers cut-off answers
    assert max(penalize_missing_eos([-3.0, -3.0], [True, False], 1.0)) == -3.0
    assert penalize_missing_eos([0.5], [True], 1.0) == [0.5]
    with pytest.raises(ValueError, match="2 scores for 1 answers"):
        penalize_missing_eos([0.1, 0.2], [True], 1.0)


def test_learning_rate_schedules():
    assert [learning_rate("constant", 1e-3, u, 4) for u in range(4)] == [1e-3] * 4
    assert [learning_rate("linear", 1.0, u, 4) for u in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="schedule must be"):
        learning_rate("cosine", 1.0, 0, 4)


def test_truncated_is_weights_by_hand():
    """w = min(exp(proximal − behaviour), cap) per token; 0 at padding; the stats over the mask."""
    proximal = torch.log(torch.tensor([[0.5, 0.2, 0.9, 0.3]]))
    behaviour = torch.log(torch.tensor([[0.25, 0.4, 0.3, 1e-30]]))  # ratios 2, 0.5, 3 (capped), padding
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    weights, stats = truncated_is_weights(proximal, behaviour, mask, cap=2.0)
    assert_close(weights, torch.tensor([[2.0, 0.5, 2.0, 0.0]]))
    assert stats["is_weight_mean"] == pytest.approx((2.0 + 0.5 + 2.0) / 3)
    assert stats["is_clipped_frac"] == pytest.approx(1 / 3)  # ratio 2 is not above the cap; 3 is
    assert stats["behaviour_gap"] == pytest.approx((math.log(2) + math.log(2) + math.log(3)) / 3)
    with pytest.raises(ValueError, match="cap must be positive"):
        truncated_is_weights(proximal, behaviour, mask, cap=0.0)


def test_the_behaviour_weights_carry_no_gradient_and_scale_each_tokens_policy_gradient():
    """The weights are constants: computed from a proximal tensor that requires grad, they have
    none; in the loss, each token's gradient is the unweighted one times its weight."""
    proximal = torch.tensor([[-0.7, -1.2]], requires_grad=True)
    weights, _ = truncated_is_weights(proximal, torch.tensor([[-1.0, -1.0]]), torch.ones(1, 2), cap=2.0)
    assert not weights.requires_grad
    advantages, mask = torch.tensor([[1.0, -2.0]]), torch.ones(1, 2)
    old = torch.tensor([[-0.7, -1.2]])

    def gradient(token_weights):
        logprobs = old.clone().requires_grad_(True)
        loss, _ = policy_loss(logprobs, old, advantages, mask, clip_range=0.2, weights=token_weights)
        loss.backward()
        return logprobs.grad

    plain = gradient(None)
    assert_close(gradient(weights), plain * weights)
    assert_close(gradient(torch.ones(1, 2)), plain)
    # a weight that requires grad is still a constant in the loss
    assert_close(gradient(weights.clone().requires_grad_(True)), plain * weights)
