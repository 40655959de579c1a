"""Join the Ray cluster in RAY_ADDRESS (as under ``ray job submit``) or start a local one, then
place the actors of a run on their placement-group bundles."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import ray

from actors import BufferActor, CriticActor, DraftTrainerActor, RankGroup, RewardWorker, RolloutEngineActor, RouterActor, TrainerActor
from miles_ray.models import resolve_model_path
from placement.groups import actor_options, create_groups, remove_groups
from placement.plan import plan_placement


def init_ray(cfg, needed_cpus: float) -> None:
    if ray.is_initialized():
        return
    env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=env, log_to_driver=True)
        return
    cpus = cfg.cluster.local_num_cpus or max(int(needed_cpus + 0.999), os.cpu_count() or 1)
    # address="local": never join some other cluster by accident (set RAY_ADDRESS=auto for that)
    ray.init(address="local", num_cpus=cpus, num_gpus=cfg.cluster.local_num_gpus, include_dashboard=False,
             runtime_env=env, log_to_driver=True)


@dataclass
class RunActors:
    policy: RankGroup
    engines: list
    rewards: list
    buffer: object
    critic: Optional[RankGroup] = None
    groups: dict = field(default_factory=dict)
    router: object = None
    router_url: Optional[str] = None
    recovery: object = None  # jobs.faults.Recovery, set by a driver
    spawn_policy: object = None  # () -> new trainer-rank actors on the same bundles
    draft: object = None  # DraftTrainerActor (speculative rollout with an online-trained draft)
    spawn_critic: object = None  # () -> new critic-rank actors on the same bundles

    def all(self) -> list:
        critics = self.critic.actors if self.critic else []
        router = [self.router] if self.router else []
        draft = [self.draft] if self.draft else []
        return [*self.policy.actors, *critics, *self.engines, *self.rewards, self.buffer, *router, *draft]


def with_resolved_model(cfg):
    """Resolve the model spec once in the driver (writes a tiny model once) and hand actors an
    absolute folder, so their working directory does not matter. GGUF specs stay symbolic."""
    where = resolve_model_path(cfg.model.path, cfg.model.tiny_cache_dir)
    if where["gguf_file"]:
        return cfg
    cfg = cfg.model_copy(deep=True)
    cfg.model.path = where["path"]
    return cfg


def start_actors(cfg, trainers: bool = True, engines: bool = True) -> RunActors:
    """Plan placement, create the groups, start every actor and wait until all are ready.
    ``trainers=False``: pure inference (no trainer ranks); ``engines=False``: training from a dump."""
    cfg = with_resolved_model(cfg)
    world = cfg.cluster.num_trainers if trainers else 0
    n_critics = world if cfg.uses_critic else 0
    http = cfg.rollout.over_http and engines
    n_engines = cfg.rollout.num_engines if engines else 0
    cluster = cfg.cluster.model_copy(update={"num_trainers": world})
    online_draft = cfg.draft.enabled and cfg.draft.online and bool(world) and bool(n_engines)
    plan = plan_placement(cluster, n_engines, cfg.reward.num_workers, n_critics, router=http, draft_trainer=online_draft)
    init_ray(cfg, plan.total_resources().get("CPU", 1))
    prefix = cfg.run_name
    groups = create_groups(plan, prefix)
    cfg_dict = cfg.model_dump()

    def opts(a):
        return actor_options(a, groups, f"{prefix}-{a.role}-{a.rank}")

    def spawn_policy(generation: int = 0):
        """Trainer ranks on their bundles; a rebuilt group gets fresh names (``-g<n>``)."""
        suffix = f"-g{generation}" if generation else ""
        return [TrainerActor.options(**{**opts(a), "name": f"{prefix}-trainer-{a.rank}{suffix}"}).remote(
            cfg_dict, a.rank, world) for a in plan.for_role("trainer")]

    def spawn_critic(generation: int = 0):
        suffix = f"-g{generation}" if generation else ""
        return [CriticActor.options(**{**opts(a), "name": f"{prefix}-critic-{a.rank}{suffix}"}).remote(
            cfg_dict, a.rank, n_critics) for a in plan.for_role("critic")]

    policy = RankGroup(spawn_policy())
    critic = RankGroup(spawn_critic()) if n_critics else None
    # engines and reward workers restart automatically; calls are not retried by Ray: the driver
    # re-sends them once the actor is back (and, for an engine, refit with the current weights)
    restart = {"max_restarts": -1, "max_task_retries": 0}
    engines = [RolloutEngineActor.options(**opts(a), **restart).remote(cfg_dict, a.rank)
               for a in plan.for_role("rollout")]
    r = cfg.reward
    rewards = [RewardWorker.options(**opts(a), **restart).remote(r.fn, r.timeout_s, r.failure_score, r.isolate)
               for a in plan.for_role("reward")]
    buffer = BufferActor.options(**opts(plan.for_role("buffer")[0])).remote()
    draft = DraftTrainerActor.options(**opts(plan.for_role("draft")[0])).remote(cfg_dict) if online_draft else None
    actors = RunActors(policy, engines, rewards, buffer, critic, groups, spawn_policy=spawn_policy, draft=draft,
                       spawn_critic=spawn_critic if n_critics else None)
    ray.get([a.ready.remote() for a in actors.all()])
    if http:  # rollout goes through the router to the engine servers
        urls = ray.get([e.url.remote() for e in engines])
        actors.router = RouterActor.options(**opts(plan.for_role("router")[0])).remote(urls)
        actors.router_url = ray.get(actors.router.url.remote())
    policy.setup()
    if critic:
        critic.setup()
    return actors


def stop_actors(actors: RunActors) -> None:
    for a in actors.all():
        ray.kill(a)
    remove_groups(actors.groups)
