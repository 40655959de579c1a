import math

import pytest
import torch

from miles_ray.algorithms import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES, compute_advantages


def test_grpo_hand_computed():
    # group 0: rewards 1, 0, 0, 1 -> mean 0.5, unbiased std sqrt(1/3)
    adv = compute_advantages("grpo", [1, 0, 0, 1, 2, 4], [0, 0, 0, 0, 1, 1])
    s = math.sqrt(1 / 3)
    expected = [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, -1 / math.sqrt(2), 1 / math.sqrt(2)]
    assert adv.tolist() == pytest.approx(expected, rel=1e-4)


def test_grpo_without_std_is_dr_grpo():
    adv = compute_advantages("grpo", [1, 0, 0, 1], [7, 7, 7, 7], normalize_std=False)
    assert adv.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])


def test_grpo_edge_cases_never_nan():
    adv = compute_advantages("grpo", [1.0, 3.0, 3.0, 3.0], [0, 1, 1, 1])  # single-sample group, equal group
    assert adv.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert torch.isfinite(adv).all()


def test_ppo_clip_hand_computed():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 1.0]]))  # ratios 1.5, 0.5, 1.1 (old logp = 0)
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 1.0, -1.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, metrics = POLICY_LOSSES["ppo_clip"](logp, old, adv, mask, eps_clip=0.2)
    # A>0, r=1.5 -> clipped to 1.2 -> -1.2 ; A>0, r=0.5 -> max(-0.5, -0.8) = -0.5 ; A<0, r=1.1 -> 1.1
    assert loss[0, :3].tolist() == pytest.approx([-1.2, -0.5, 1.1], rel=1e-5)
    assert metrics["clipfrac"] == pytest.approx(1 / 3)
    agg = LOSS_AGGREGATIONS["token_mean"](loss, mask, 3.0, 1.0)
    assert agg.item() == pytest.approx((-1.2 - 0.5 + 1.1) / 3, rel=1e-5)


def test_aggregations_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert LOSS_AGGREGATIONS["token_mean"](loss, mask, 4, 2).item() == pytest.approx(10 / 4)
    assert LOSS_AGGREGATIONS["seq_mean_token_sum"](loss, mask, 4, 2).item() == pytest.approx(10 / 2)
    assert LOSS_AGGREGATIONS["seq_mean_token_mean"](loss, mask, 4, 2).item() == pytest.approx((2 + 4) / 2)
    empty = torch.zeros(1, 3)
    assert LOSS_AGGREGATIONS["seq_mean_token_mean"](loss[:1], empty, 0, 1).item() == 0.0  # fully masked: 0


def test_kl_estimators_hand_computed():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    d = math.log(0.5) - math.log(0.25)
    assert KL_ESTIMATORS["k1"](logp, ref).item() == pytest.approx(d)
    assert KL_ESTIMATORS["k2"](logp, ref).item() == pytest.approx(0.5 * d * d)
    assert KL_ESTIMATORS["k3"](logp, ref).item() == pytest.approx(0.5 - math.log(0.5) - 1)
    assert KL_ESTIMATORS["k3"](ref, ref).item() == 0.0


def test_registries_list_names():
    assert "grpo" in ADVANTAGE_ESTIMATORS and "ppo_clip" in POLICY_LOSSES
    with pytest.raises(KeyError, match="registered"):
        ADVANTAGE_ESTIMATORS.get_fn("nope")
