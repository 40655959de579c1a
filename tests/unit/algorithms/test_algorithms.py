import math

import pytest
import torch

from miles_ray.algorithms import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
from miles_ray.algorithms import AdvantageInputs, compute_advantages
from miles_ray.algorithms import scalar_advantages as sa


def test_grpo_hand_computed():
    # group 0: rewards 1, 0, 0, 1 -> mean 0.5, unbiased std sqrt(1/3)
    adv = sa("grpo", [1, 0, 0, 1, 2, 4], [0, 0, 0, 0, 1, 1])
    s = math.sqrt(1 / 3)
    expected = [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, -1 / math.sqrt(2), 1 / math.sqrt(2)]
    assert adv.tolist() == pytest.approx(expected, rel=1e-4)


def test_grpo_without_std_is_dr_grpo():
    adv = sa("grpo", [1, 0, 0, 1], [7, 7, 7, 7], normalize_std=False)
    assert adv.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])


def test_grpo_edge_cases_never_nan():
    adv = sa("grpo", [1.0, 3.0, 3.0, 3.0], [0, 1, 1, 1])  # single-sample group, equal group
    assert adv.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert torch.isfinite(adv).all()


def test_ppo_clip_hand_computed():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 1.0]]))  # ratios 1.5, 0.5, 1.1 (old logp = 0)
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 1.0, -1.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, metrics = POLICY_LOSSES["ppo_clip"](logp, old, adv, mask, eps_low=0.2, eps_high=0.2)
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


def _inputs(rewards, groups, lengths, **kw):
    mask = torch.zeros(len(rewards), max(lengths))
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return AdvantageInputs(torch.tensor(rewards, dtype=torch.float32), torch.tensor(groups), mask, **kw)


def test_rloo_hand_computed_and_edges():
    adv = sa("rloo", [1, 0, 0, 1, 5], [0, 0, 0, 0, 1])
    assert adv.tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.0], abs=1e-6)
    assert sa("rloo", [2, 2, 2], [0, 0, 0]).tolist() == [0.0, 0.0, 0.0]


def test_reinforce_pp_hand_computed():
    adv, ret = compute_advantages("reinforce_pp", _inputs([1, 0], [0, 1], [2, 1]))
    s = 1 / math.sqrt(3)  # tokens' returns 1, 1, 0: mean 2/3, unbiased std sqrt(1/3)
    assert adv[0].tolist() == pytest.approx([(1 / 3) / s, (1 / 3) / s], rel=1e-4)
    assert adv[1, 0].item() == pytest.approx((-2 / 3) / s, rel=1e-4) and adv[1, 1].item() == 0.0
    assert ret is None


def test_reinforce_pp_kl_penalty_in_token_rewards():
    from miles_ray.algorithms.advantages import discounted_returns, token_rewards

    inp = _inputs([1, 0], [0, 1], [2, 1], kl=torch.tensor([[0.1, 0.2], [0.3, 0.0]]), kl_coef=0.5)
    r = token_rewards(inp)
    assert r.flatten().tolist() == pytest.approx([-0.05, 0.9, -0.15, 0.0])
    assert discounted_returns(r, inp.mask.double(), 1.0).flatten().tolist() == pytest.approx([0.85, 0.9, -0.15, 0.0])
    assert discounted_returns(r, inp.mask.double(), 0.5).flatten().tolist() == pytest.approx([0.4, 0.9, -0.15, 0.0])


def test_reinforce_pp_baseline_subtracts_group_mean():
    adv, _ = compute_advantages("reinforce_pp_baseline", _inputs([1, 0], [0, 0], [2, 1]))
    s = 1 / math.sqrt(3)
    assert adv[0].tolist() == pytest.approx([(1 / 3) / s] * 2, rel=1e-4)
    assert adv[1, 0].item() == pytest.approx((-2 / 3) / s, rel=1e-4)


def test_gae_hand_computed():
    inp = _inputs([1], [0], [2], values=torch.tensor([[0.5, 0.8]]), gamma=0.9, lam=0.5)
    adv, ret = compute_advantages("gae", inp)
    # delta_1 = 1 - 0.8 = 0.2 ; delta_0 = 0.9 * 0.8 - 0.5 = 0.22 ; A_0 = 0.22 + 0.45 * 0.2 = 0.31
    assert ret[0].tolist() == pytest.approx([0.31 + 0.5, 0.2 + 0.8], rel=1e-5)
    assert adv[0].tolist() == pytest.approx([1 / math.sqrt(2), -1 / math.sqrt(2)], rel=1e-4)  # whitened
    with pytest.raises(ValueError, match="critic"):
        compute_advantages("gae", _inputs([1], [0], [2]))


def test_estimators_on_fully_masked_and_constant_batches():
    for name in ADVANTAGE_ESTIMATORS:
        kw = {"values": torch.zeros(3, 2)} if name == "gae" else {}
        adv, _ = compute_advantages(name, _inputs([1, 1, 1], [0, 0, 0], [2, 0, 1], **kw))
        assert torch.isfinite(adv).all(), name
        assert adv[1].abs().sum() == 0, name  # the empty sequence gets nothing
        kw = {"values": torch.zeros(2, 0)} if name == "gae" else {}
        adv, _ = compute_advantages(name, _inputs([0, 0], [0, 1], [0, 0], **kw))
        assert torch.isfinite(adv).all() and adv.abs().sum() == 0, name


def test_dual_clip_and_asymmetric_clip():
    logp = torch.log(torch.tensor([[5.0, 1.3, 0.7]]))
    old, mask = torch.zeros(1, 3), torch.ones(1, 3)
    adv = torch.tensor([[-1.0, 1.0, -1.0]])
    loss, _ = POLICY_LOSSES["ppo_clip"](logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    assert loss[0].tolist() == pytest.approx([5.0, -1.28, 0.8], rel=1e-5)
    loss, m = POLICY_LOSSES["ppo_clip"](logp, old, adv, mask, eps_low=0.2, eps_high=0.28, dual_clip=3.0)
    assert loss[0].tolist() == pytest.approx([3.0, -1.28, 0.8], rel=1e-5)  # A<0 capped at -c*A = 3
    assert m["dual_clipfrac"] == pytest.approx(1 / 3)


def test_gspo_sequence_ratio_and_gradient():
    old = torch.zeros(1, 3)
    logp = torch.tensor([[0.1, 0.3, 9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # third token masked: it must not move the ratio
    adv = torch.ones(1, 3)
    loss, _ = POLICY_LOSSES["gspo"](logp, old, adv, mask, eps_low=0.3, eps_high=0.3)
    s = math.exp(0.2)
    assert loss[0, :2].tolist() == pytest.approx([-s, -s], rel=1e-5)
    (loss * mask).sum().backward()
    assert logp.grad[0, :2].tolist() == pytest.approx([-s, -s], rel=1e-5)
    clipped, _ = POLICY_LOSSES["gspo"](logp, old, adv, mask, eps_low=0.3, eps_high=0.1)
    assert clipped[0, :2].tolist() == pytest.approx([-1.1, -1.1], rel=1e-5)


def test_value_loss_clipped():
    from miles_ray.algorithms.losses import value_loss

    v, old, ret = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([2.0, 1.0])
    # token 0: unclipped (1-2)^2 = 1, clipped V = 0.2 -> (0.2-2)^2 = 3.24 -> max 3.24 ; token 1: 1
    assert value_loss(v, old, ret, None, clip=0.2).tolist() == pytest.approx([1.62, 0.5])
    assert value_loss(v, old, ret, None, clip=None).tolist() == pytest.approx([0.5, 0.5])


def test_assign_advantages_with_kl_reward():
    from miles_ray.algorithms import assign_advantages
    from miles_ray.config import AlgorithmConfig
    from miles_ray.sample import Sample

    samples = [Sample(0, 0, "p", "1", [1], response_ids=[5, 6], reward=r, old_logprobs=[-1.0, -1.0],
                      ref_logprobs=[-1.5, -1.0]) for r in (1.0, 0.0)]
    algo = AlgorithmConfig(advantage="grpo", kl_coef=0.5, kl_mode="reward", kl_estimator="k1")
    metrics = assign_advantages(samples, algo)
    assert metrics["kl_reward_penalty"] == pytest.approx(0.25)  # k1 = 0.5 on one token, times 0.5
    # equal KL on both: GRPO of (1, 0) is +-0.5 / std(1, 0) = +-0.5 / sqrt(0.5)
    assert samples[0].advantages == pytest.approx([0.5 / math.sqrt(0.5)] * 2, rel=1e-4)
    assert samples[1].advantages == pytest.approx([-0.5 / math.sqrt(0.5)] * 2, rel=1e-4)


def test_importance_weights_tis_mis_token_and_sequence():
    from miles_ray.algorithms.off_policy import importance_weights
    from miles_ray.config import OffPolicyConfig

    prox = torch.log(torch.tensor([[0.5, 0.9, 0.2]]))
    behav = torch.log(torch.tensor([[0.1, 0.9, 0.4]]))  # token ratios 5, 1, 0.5
    mask = torch.tensor([[1.0, 1.0, 1.0]])
    w, m = importance_weights(prox, behav, mask, OffPolicyConfig(mode="tis", clip=2.0))
    assert w[0].tolist() == pytest.approx([2.0, 1.0, 0.5]) and m["is_frac_truncated"] == pytest.approx(1 / 3)
    w, m = importance_weights(prox, behav, mask, OffPolicyConfig(mode="mis", mask_low=0.6, mask_high=2.0))
    assert w[0].tolist() == pytest.approx([0.0, 1.0, 0.0]) and m["is_frac_masked"] == pytest.approx(2 / 3)
    w, _ = importance_weights(prox, behav, mask, OffPolicyConfig(mode="tis", level="sequence", clip=10.0))
    assert w[0].tolist() == pytest.approx([2.5] * 3)  # 5 * 1 * 0.5
    assert m["kl_behav_prox"] == pytest.approx(float((behav - prox).mean()))


def test_staleness_controller_bound_and_invariant():
    import random

    from miles_ray.async_rl import StalenessController

    rng = random.Random(0)
    for S in (0, 1, 2):
        c, version, batch, consumed = StalenessController(S, 4), 0, 4, 0
        submit_version = []
        for _ in range(2000):
            event = rng.random()
            if event < 0.4 and c.capacity(version):
                n = rng.randint(1, c.capacity(version))
                c.submit(n, version)
                submit_version += [version] * n
            elif event < 0.8 and c.running:
                (c.accept if rng.random() < 0.8 else c.filter)()
            elif c.accepted - consumed >= batch:  # a train step consumes the oldest batch
                consumed += batch
                version += 1
            assert c.submitted == c.accepted + c.filtered + c.running
            assert c.accepted + c.running <= (S + version + 1) * batch
        assert version > 10
    with pytest.raises(RuntimeError, match="staleness bound"):
        StalenessController(0, 2).submit(3, 0)
