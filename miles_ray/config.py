"""One typed config for a run: pydantic models, loaded from YAML plus ``key.sub=value`` overrides.

Unknown keys and wrong types fail at start with a :class:`ConfigError` that names the key and,
for unknown keys, the closest valid one.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from miles_ray.config_sections import (  # noqa: F401  (re-exported: the sections are part of this API)
    ConfigError, Section, ModelConfig, DataConfig,
    RolloutConfig, RewardConfig, AlgorithmConfig, TrainConfig,
    WeightSyncConfig, ClusterConfig, OffPolicyConfig, AsyncConfig,
    CheckpointConfig, FaultConfig, DraftConfig, LoggingConfig,
    MegatronConfig, AgentConfig, ServeConfig, EvalConfig, EvalDataset,
    RewardServiceConfig, SandboxConfig,
)
from miles_ray.errors import UserError


class Config(Section):
    run_name: str = "grpo-arith"
    output_dir: str = "runs/default"
    total_steps: int = Field(40, ge=1)
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    train: TrainConfig = TrainConfig()
    cluster: ClusterConfig = ClusterConfig()
    weight_sync: WeightSyncConfig = WeightSyncConfig()
    async_rl: AsyncConfig = AsyncConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    faults: FaultConfig = FaultConfig()
    draft: DraftConfig = DraftConfig()
    megatron: MegatronConfig = MegatronConfig()
    agent: AgentConfig = AgentConfig()
    serve: ServeConfig = ServeConfig()
    eval: EvalConfig = EvalConfig()
    resume: str = Field("none", description="none | auto (latest checkpoint, if any) | a checkpoint folder")
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _check_registries(self) -> "Config":
        """Plug-ins of the registries below the config (a name or a checked ``pkg.module:attr``; a
        PluginError names the key). Rewards, rollout functions, environments, lr schedules and training
        backends live above it: ``jobs.plugins.check_plugins`` checks them before any actor starts."""
        from miles_ray.algorithms import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
        from miles_ray.async_rl import GROUP_FILTERS
        from miles_ray.data import check_source

        a = self.algorithm
        for value, registry in ((a.advantage, ADVANTAGE_ESTIMATORS), (a.policy_loss, POLICY_LOSSES),
                                (a.loss_agg, LOSS_AGGREGATIONS), (a.kl_estimator, KL_ESTIMATORS),
                                (self.async_rl.filter, GROUP_FILTERS)):
            registry.check(value)
        check_source(self.data.source)
        per_minibatch = self.rollout.prompts_per_step * self.rollout.n_samples_per_prompt // self.train.num_minibatches
        if per_minibatch < self.cluster.num_trainers:
            raise ValueError(f"each mini-batch has {per_minibatch} samples, fewer than cluster.num_trainers="
                             f"{self.cluster.num_trainers}; lower train.num_minibatches or raise rollout.prompts_per_step")
        from miles_ray.weights.registry import weight_transport

        if problem := weight_transport(self.weight_sync.transport).config_problem(self):  # the transport's own rules
            raise ValueError(problem)
        if self.cluster.colocate and self.cluster.use_gpu and self.cluster.gpus_per_engine > 1:
            raise ValueError("cluster.gpus_per_engine > 1 gives one engine several GPUs in its own bundle: it needs "
                             "cluster.colocate=false (colocated multi-GPU engines are not supported yet)")
        if self.rollout.strict_sglang and not (self.rollout.backend == "native" and self.rollout.serve_http):
            raise ValueError("rollout.strict_sglang runs our native server in SGLang's strict mode: it needs "
                             "rollout.backend=native and rollout.serve_http=true")
        if self.draft.enabled and self.rollout.backend == "hf":
            raise ValueError("draft.enabled (speculative rollout) needs rollout.backend=native or sglang")
        if self.draft.enabled and self.rollout.backend == "native" and self.rollout.serve_http:
            raise ValueError("draft.enabled with rollout.backend=native runs in-actor engines; set rollout.serve_http=false")
        if self.draft.enabled and self.draft.online and self.rollout.over_http:
            raise ValueError("an online-trained draft (draft.online=true) reaches in-actor native engines only; "
                             "with engines over HTTP (sglang, serve_http) set draft.online=false (frozen draft)")
        from miles_ray.utils.sglang_version import resolve_sglang_version, returns_routed_experts

        sglang = resolve_sglang_version(self.rollout.sglang_version)
        if self.algorithm.routing_replay == "r3" and self.rollout.sglang_api and not returns_routed_experts(sglang):
            raise ValueError(f"algorithm.routing_replay=r3 needs routed experts, which SGLang {sglang} cannot return "
                             "(rollout.sglang_version): use SGLang >= 0.5.23 or rollout.backend=native without "
                             "strict_sglang")
        if self.algorithm.true_on_policy and self.rollout.backend != "native":
            raise ValueError("algorithm.true_on_policy needs rollout.backend=native (the engine that runs the exact "
                             f"forward), not {self.rollout.backend}")
        if self.algorithm.routing_replay == "r3" and self.rollout.backend not in ("native", "sglang"):
            raise ValueError("algorithm.routing_replay=r3 needs rollout.backend=native or sglang (engines that "
                             f"record routing), not {self.rollout.backend}")
        mixed = self.train.precision == "bf16_mixed" or (self.train.precision == "auto" and self.model.dtype != "float32")
        if self.algorithm.true_on_policy and (mixed or (self.train.precision == "bf16") != (self.model.dtype == "bfloat16")):
            raise ValueError("algorithm.true_on_policy needs the trainer to compute in the engines' dtype: model.dtype="
                             "float32 with train.precision=fp32 (or auto), or model.dtype=bfloat16 with train.precision=bf16")
        if self.algorithm.true_on_policy and (self.draft.enabled or self.rollout.serve_http):
            raise ValueError("algorithm.true_on_policy runs in-actor native engines without speculation; set "
                             "draft.enabled=false and rollout.serve_http=false")
        if self.algorithm.true_on_policy and self.train.strategy == "fsdp2" and self.cluster.num_trainers > 1:
            raise ValueError("algorithm.true_on_policy with train.strategy=fsdp2 and cluster.num_trainers > 1 is refused: the "
                             "exact forward reads whole weights and never gathers FSDP2's shards; use train.strategy=ddp "
                             "(replicas) or cluster.num_trainers=1")
        if self.train.precision == "fp8_unified" and self.rollout.precision != "fp8":
            raise ValueError("train.precision=fp8_unified trains on the engines' FP8 numbers: set rollout.precision=fp8")
        if self.train.qat == "int4" and self.rollout.precision != "int4":
            raise ValueError("train.qat=int4 trains on the engines' INT4 weights: set rollout.precision=int4")
        if self.rollout.precision != "bf16" and (self.rollout.over_http or self.algorithm.true_on_policy):
            raise ValueError(f"rollout.precision={self.rollout.precision} quantizes in-actor engines during weight sync; it "
                             "does not combine with engines over HTTP or algorithm.true_on_policy")
        if self.rollout.serve_http and self.rollout.backend == "hf":
            raise ValueError("rollout.serve_http needs rollout.backend=native or sglang")
        if self.rollout.fn == "multi_turn" and not self.agent.env:
            raise ValueError("rollout.fn=multi_turn talks with an environment: set agent.env (e.g. calculator)")
        from miles_ray.eval import config_problem

        if problem := config_problem(self):
            raise ValueError(problem)
        return self

    @property
    def old_logprob_pass(self) -> bool:
        """False when the old log-probs equal the training forward's own: the sync driver with one
        optimizer step per batch and no KL-in-reward (which needs them before advantages)."""
        a, t = self.algorithm, self.train
        one_step = t.num_minibatches == 1 and t.ppo_epochs == 1
        return self.async_rl.enabled or not one_step or (a.kl_coef > 0 and a.kl_mode == "reward")

    @property
    def exact_max_len(self) -> int:
        """The exact forward's fixed key length in true on-policy mode (0: the mode is off)."""
        if not self.algorithm.true_on_policy:
            return 0
        n = self.algorithm.true_on_policy_max_len or self.data.max_prompt_tokens + self.rollout.max_new_tokens
        return -(-n // 64) * 64

    @property
    def optimizer_steps(self) -> int:
        """RL optimizer steps in the run (the learning-rate schedule's length)."""
        return self.total_steps * self.train.num_minibatches * self.train.ppo_epochs

    @property
    def uses_critic(self) -> bool:
        return self.algorithm.advantage == "gae"


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_known_keys(ann, prefix + name + "."))
    return keys


def _check_keys(data: dict, model: type[BaseModel], prefix: str, where: str) -> None:
    for key, value in data.items():
        full = prefix + str(key)
        if key not in model.model_fields:
            options = [k for k in _known_keys(Config) if k.count(".") == full.count(".")]
            close = difflib.get_close_matches(full, options, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"Unknown config key '{full}' ({where}).{hint}")
        ann = model.model_fields[key].annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            if not isinstance(value, dict):
                raise ConfigError(f"Config key '{full}' ({where}) is a section; give it a mapping, not {value!r}")
            _check_keys(value, ann, full + ".", where)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"Override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ``["train.lr=1e-4", "total_steps=5"]`` into a nested dict (values parsed as YAML)."""
    data: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        _check_keys_path(key.strip())
        _set_dotted(data, key.strip(), value)
    return data


def _check_keys_path(dotted: str) -> None:
    known = _known_keys(Config)
    if dotted not in known:
        close = difflib.get_close_matches(dotted, known, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"Unknown config key '{dotted}' (command line).{hint}")


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _format_validation(err: ValidationError) -> str:
    """One ``config key 'k': why`` line per error; a single :class:`UserError` raised by a validator (a
    plug-in that does not load) keeps its own one-line message."""
    errors = err.errors()
    own = errors[0].get("ctx", {}).get("error") if len(errors) == 1 else None
    if isinstance(own, UserError):
        return str(own)
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
        lines.append(f"  config key '{key}': {e['msg']}{got}")
    return "Invalid config:\n" + "\n".join(lines)


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML file (optional) and apply ``key.sub=value`` overrides; validate everything."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file '{path}' does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"Config file '{path}' must hold a mapping at top level")
        _check_keys(data, Config, "", f"in {path}")
    data = _merge(data, parse_overrides(overrides or []))
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation(err)) from None
