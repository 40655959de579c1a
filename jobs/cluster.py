"""Join the Ray cluster in RAY_ADDRESS (as under ``ray job submit``) or start a local one, then
place the actors of a run on their placement-group bundles (:func:`start_actors`)."""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Callable, Optional

import ray
from ray.actor import ActorHandle
from ray.util.placement_group import PlacementGroup

from actors import BufferActor, CriticActor, DraftTrainerActor, RankGroup, RewardWorker, RolloutEngineActor, RouterActor, TrainerActor
from miles_ray.config import Config
from miles_ray.eval import dedicated_engines
from miles_ray.models import resolve_model_path
from miles_ray.rollout.http.guard import new_token, register
from placement.groups import actor_options, create_groups, remove_groups
from placement.plan import plan_placement

log = logging.getLogger("miles_ray.cluster")
Spawner = Callable[[int], list]  # generation -> new rank actors on the same bundles


def init_ray(cfg: Config, needed_cpus: float) -> bool:
    """Join RAY_ADDRESS's cluster or start a local one, in the namespace ``cluster.namespace`` (named
    actors ``<run_name>-<role>-<rank>`` can be found from another driver in that namespace). A
    local Ray serves its dashboard (``cluster.dashboard``) and its URL is printed. A Ray that is
    already initialized (tests, a user's own session) is used as it is. Returns whether the
    cluster may grow (False only for the private local Ray started here: no autoscaler)."""
    if ray.is_initialized():
        return True
    common = {"runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
              "log_to_driver": True, "namespace": cfg.cluster.namespace}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**common)
        return True
    cpus = cfg.cluster.local_num_cpus or max(int(needed_cpus + 0.999), os.cpu_count() or 1)
    # address="local": never join some other cluster by accident (set RAY_ADDRESS=auto for that)
    ctx = ray.init(address="local", num_cpus=cpus, num_gpus=cfg.cluster.local_num_gpus, **dashboard_args(cfg.cluster),
                   **common)
    if ctx.dashboard_url:
        print(f"Ray dashboard (the run's actors, role by role): http://{ctx.dashboard_url}", flush=True)
    return False


def dashboard_args(cluster) -> dict:
    """``ray.init`` arguments for the dashboard of a local Ray: on ``cluster.dashboard_host``, at
    ``cluster.dashboard_port`` or, when that port is taken (another run), a free one."""
    if not cluster.dashboard:
        return {"include_dashboard": False}
    port = free_port(cluster.dashboard_host, cluster.dashboard_port)
    if port != cluster.dashboard_port:
        log.warning("dashboard port %d is taken; the dashboard uses port %d", cluster.dashboard_port, port)
    return {"include_dashboard": True, "dashboard_host": cluster.dashboard_host, "dashboard_port": port}


def free_port(host: str, preferred: int) -> int:
    """``preferred`` if it can be bound on ``host`` (0: any), else a port the OS picks."""
    for port in ((preferred, 0) if preferred else (0,)):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError(f"no free port on {host}")


@dataclass
class RunActors:
    """Handles of one run's actors. Only :meth:`respawn_trainers` replaces ``policy`` and
    ``critic`` (a trainer-rank death); every other field is fixed once :func:`start_actors` returns."""
    policy: RankGroup
    engines: list[ActorHandle]
    rewards: list[ActorHandle]
    buffer: ActorHandle
    critic: Optional[RankGroup] = None
    draft: Optional[ActorHandle] = None  # DraftTrainerActor (speculative rollout, online draft)
    eval_engines: list[ActorHandle] = field(default_factory=list)  # evaluate only; get every weight sync
    router: Optional[ActorHandle] = None
    router_url: Optional[str] = None
    groups: dict[str, PlacementGroup] = field(default_factory=dict)
    spawn_policy: Optional[Spawner] = None
    spawn_critic: Optional[Spawner] = None
    generation: int = 0  # trainer groups rebuilt so far

    def trainer_ranks(self) -> list[ActorHandle]:
        return self.policy.actors + (self.critic.actors if self.critic else [])

    def all(self) -> list[ActorHandle]:
        router = [self.router] if self.router else []
        draft = [self.draft] if self.draft else []
        return [*self.trainer_ranks(), *self.engines, *self.rewards, self.buffer, *router, *draft, *self.eval_engines]

    def respawn_trainers(self, wait: Callable[[list], None] = lambda ranks: None) -> None:
        """Kill every policy (and critic) rank (survivors are stuck in a collective with the dead
        one) and start new groups on the same bundles, with fresh names (``-g<generation>``);
        ``wait(ranks)`` before they join a group (their bundles may wait for a node)."""
        for rank in self.trainer_ranks():
            ray.kill(rank)
        self.generation += 1
        self.policy = RankGroup(self.spawn_policy(self.generation))
        if self.critic is not None:
            self.critic = RankGroup(self.spawn_critic(self.generation))
        wait(self.trainer_ranks())
        self.policy.setup()
        if self.critic is not None:
            self.critic.setup()


def with_resolved_model(cfg: Config) -> Config:
    """Resolve the model spec once in the driver (writes a tiny model once) and hand actors an
    absolute folder, so their working directory does not matter. GGUF specs stay symbolic."""
    where = resolve_model_path(cfg.model.path, cfg.model.tiny_cache_dir)
    if where["gguf_file"]:
        return cfg
    cfg = cfg.model_copy(deep=True)
    cfg.model.path = where["path"]
    return cfg


def start_actors(cfg: Config, trainers: bool = True, engines: bool = True) -> RunActors:
    """Plan placement, create the groups, start every actor and wait until all are ready.
    ``trainers=False``: pure inference (no trainer ranks); ``engines=False``: training from a dump."""
    cfg = with_resolved_model(cfg)
    world = cfg.cluster.num_trainers if trainers else 0
    n_critics = world if cfg.uses_critic else 0
    http = cfg.rollout.over_http and engines
    n_engines = cfg.rollout.num_engines if engines else 0
    cluster = cfg.cluster.model_copy(update={"num_trainers": world})
    online_draft = cfg.draft.enabled and cfg.draft.online and bool(world) and bool(n_engines)
    n_eval = dedicated_engines(cfg, bool(n_engines))
    plan = plan_placement(cluster, n_engines, cfg.reward.num_workers, n_critics, router=http,
                          draft_trainer=online_draft, eval_engines=n_eval)
    can_grow = init_ray(cfg, plan.total_resources().get("CPU", 1))
    prefix = cfg.run_name
    groups = create_groups(plan, prefix, cfg.cluster.pg_timeout_s, can_grow)
    cfg_dict = cfg.model_dump()

    def opts(a, suffix: str = ""):
        return actor_options(a, groups, f"{prefix}-{a.role}-{a.rank}{suffix}")

    def spawner(actor_cls, role: str, size: int) -> Spawner:
        def spawn(generation: int = 0) -> list:
            suffix = f"-g{generation}" if generation else ""
            return [actor_cls.options(**opts(a, suffix)).remote(cfg_dict, a.rank, size) for a in plan.for_role(role)]
        return spawn

    spawn_policy = spawner(TrainerActor, "trainer", world)
    spawn_critic = spawner(CriticActor, "critic", n_critics) if n_critics else None
    # engines and reward workers restart automatically; calls are not retried by Ray: the driver
    # re-sends them once the actor is back (and, for an engine, refit with the current weights)
    restart = {"max_restarts": -1, "max_task_retries": 0}
    r = cfg.reward
    token = new_token() if cfg.rollout.server_host else None  # servers beyond loopback require it
    actors = RunActors(
        policy=RankGroup(spawn_policy()),
        critic=RankGroup(spawn_critic()) if spawn_critic else None,
        engines=[RolloutEngineActor.options(**opts(a), **restart).remote(cfg_dict, a.rank, token)
                 for a in plan.for_role("rollout")],
        rewards=[RewardWorker.options(**opts(a), **restart).remote(r.fn, r.timeout_s, r.failure_score, r.isolate,
                                                                   reward_options(cfg))
                 for a in plan.for_role("reward")],
        buffer=BufferActor.options(**opts(plan.for_role("buffer")[0])).remote(),
        draft=DraftTrainerActor.options(**opts(plan.for_role("draft")[0])).remote(cfg_dict) if online_draft else None,
        groups=groups, spawn_policy=spawn_policy, spawn_critic=spawn_critic,
        # ranks after the rollout engines' (own sampling seeds); never behind the router
        eval_engines=[RolloutEngineActor.options(**opts(a), **restart).remote(cfg_dict, n_engines + a.rank, token)
                      for a in plan.for_role("eval")])
    ray.get([a.ready.remote() for a in actors.all()])
    if http:  # rollout goes through the router to the engine servers
        urls = ray.get([e.url.remote() for e in actors.engines])
        for url in urls:
            register(url, token)
        actors.router = RouterActor.options(**opts(plan.for_role("router")[0])).remote(
            urls, host=cfg.rollout.server_host, token=token, kind=cfg.rollout.router)
        actors.router_url = ray.get(actors.router.url.remote())
        register(actors.router_url, token)  # this driver's EngineClients send it
    actors.policy.setup()
    if actors.critic:
        actors.critic.setup()
    return actors


def stop_actors(actors: RunActors) -> None:
    for a in actors.all():
        ray.kill(a)
    remove_groups(actors.groups)


def reward_options(cfg: Config) -> dict:
    """What reward factories are built with: the ``reward`` section, and where the run's Ray Serve
    applications answer (``serve_url``: the HTTP proxy; the OpenAI endpoint is ``serve_url/v1``)."""
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    return {**cfg.reward.model_dump(), "serve_url": f"http://{host}:{cfg.serve.port}",
            "serve_api_key": cfg.serve.api_key, "model_name": cfg.serve.model_name}
