import pytest

from miles_ray.config import ClusterConfig
from placement import check_fits, plan_placement


def test_disaggregated_plan_gpu():
    plan = plan_placement(ClusterConfig(num_trainers=2, use_gpu=True), num_engines=2, num_reward_workers=2)
    names = [g.name for g in plan.groups]
    assert names == ["trainer", "rollout", "service"]
    assert plan.groups[0].strategy == "PACK" and plan.groups[1].strategy == "SPREAD"
    assert plan.total_resources()["GPU"] == 4
    trainers, engines = plan.for_role("trainer"), plan.for_role("rollout")
    assert [(a.group, a.bundle_index, a.num_gpus) for a in trainers] == [("trainer", 0, 1.0), ("trainer", 1, 1.0)]
    assert [(a.group, a.bundle_index, a.num_gpus) for a in engines] == [("rollout", 0, 1.0), ("rollout", 1, 1.0)]
    assert [a.bundle_index for a in plan.for_role("reward")] == [0, 1]
    assert plan.for_role("buffer")[0].bundle_index == 2
    assert all(b == {"CPU": 0.5} for b in plan.groups[2].bundles)  # services never take GPUs


def test_colocated_plan_shares_bundles():
    plan = plan_placement(ClusterConfig(num_trainers=4, use_gpu=True, colocate=True, gpus_per_engine=2),
                          num_engines=2, num_reward_workers=1)
    assert [g.name for g in plan.groups] == ["colocated", "service"]
    assert plan.total_resources()["GPU"] == 4  # 4 GPUs shared, not 4 + 4
    engines = plan.for_role("rollout")
    assert [a.bundle_indices for a in engines] == [[0, 1], [2, 3]]
    assert all(a.num_gpus == 0.5 for a in plan.assignments if a.role in ("trainer", "rollout"))
    # every bundle's GPU is requested by at most one trainer share + one engine share
    per_bundle = {}
    for a in plan.assignments:
        if a.group == "colocated":
            per_bundle[a.bundle_index] = per_bundle.get(a.bundle_index, 0) + a.num_gpus
    assert max(per_bundle.values()) <= 1.0


def test_cpu_plan_requests_no_gpus():
    plan = plan_placement(ClusterConfig(num_trainers=1), num_engines=2, num_reward_workers=1)
    assert "GPU" not in plan.total_resources()
    assert plan.total_resources()["CPU"] == pytest.approx(0.5 * 5)


def test_check_fits_warns_naming_missing_resource():
    """Not an error: an autoscaler adds nodes for pending placement groups (create_groups waits)."""
    plan = plan_placement(ClusterConfig(num_trainers=2, use_gpu=True), 2, 1)
    warning = check_fits(plan, {"CPU": 16})
    assert "GPU: needs 4, cluster has 0" in warning and "use_gpu=false" in warning and "pg_timeout_s" in warning
    assert check_fits(plan, {"CPU": 16, "GPU": 4}) == ""


def test_critic_ranks_get_their_own_group_or_share_colocated():
    plan = plan_placement(ClusterConfig(num_trainers=2, use_gpu=True), 1, 1, num_critics=2)
    assert [g.name for g in plan.groups] == ["trainer", "rollout", "critic", "service"]
    assert [(a.group, a.num_gpus) for a in plan.for_role("critic")] == [("critic", 1.0)] * 2
    plan = plan_placement(ClusterConfig(num_trainers=2, use_gpu=True, colocate=True), 2, 1, num_critics=2)
    shares = [a.num_gpus for a in plan.assignments if a.group == "colocated"]
    assert shares == pytest.approx([1 / 3] * 6) and plan.total_resources()["GPU"] == 2


def test_draft_trainer_placement():
    from miles_ray.config import ClusterConfig
    from placement.plan import plan_placement

    dis = plan_placement(ClusterConfig(num_trainers=2, use_gpu=True), 2, 1, draft_trainer=True)
    [draft] = dis.for_role("draft")
    assert draft.group == "draft" and draft.num_gpus == 1.0
    assert [g.bundles for g in dis.groups if g.name == "draft"] == [[{"CPU": 0.5, "GPU": 1.0}]]
    col = plan_placement(ClusterConfig(num_trainers=1, use_gpu=True, colocate=True), 1, 1, draft_trainer=True)
    [draft] = col.for_role("draft")
    assert draft.group == "colocated" and draft.num_gpus == pytest.approx(1 / 3)
    assert col.total_resources()["GPU"] == 1.0  # trainer, engine and draft trainer share one GPU
