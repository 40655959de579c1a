"""The memory plan (miles_ray.plan): parameter counts and model-state bytes exact against real
models and a real trainer step, the published sizes of the example configs, colocated phases, and
the CLI (`miles-ray plan`; `miles-ray train` refusing a GPU plan that does not fit, and --force)
without starting Ray."""
import json
from pathlib import Path

import pytest
import torch

from miles_ray.config import load_config
from miles_ray.plan import count_parameters, memory_plan, read_model_config
from miles_ray.plan.trainer import (gradient_bytes, optimizer_bytes, parameter_bytes, policy_rank,
                                    resolve_precision)
from miles_ray.plan.params import active_parameters, inventory
from miles_ray.sample import Sample

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples" / "models"


def _real_numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "mixtral", "qwen2", "llama"])
def test_count_matches_tiny_models(arch, model_cache):
    from miles_ray.models import load_model

    config = read_model_config(f"tiny:{arch}", model_cache)
    assert count_parameters(config) == _real_numel(load_model(f"tiny:{arch}", "float32", model_cache))


def _deepseek_v3():
    from transformers import DeepseekV3Config

    return DeepseekV3Config(vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                            n_shared_experts=2, num_experts_per_tok=2, n_group=2, topk_group=1,
                            first_k_dense_replace=1, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
                            qk_rope_head_dim=8, v_head_dim=16)


def _biased():
    from transformers import LlamaConfig, Qwen2Config

    return [Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
            LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)]


def test_count_matches_deepseek_v3_and_biased_layouts():
    """MLA, shared experts, first_k_dense_replace (DeepSeek-V3); q/k/v biases (Qwen2); attention
    and MLP biases, untied head (Llama): built by transformers from the same config."""
    from transformers import AutoModelForCausalLM

    for hf in [_deepseek_v3(), *_biased()]:
        assert count_parameters(hf.to_dict()) == _real_numel(AutoModelForCausalLM.from_config(hf)), hf.model_type


@pytest.mark.parametrize("name, published, tol", [
    ("Qwen3-0.6B", 0.6e9, 0.01), ("Qwen3-8B", 8.2e9, 0.005), ("Qwen3-30B-A3B", 30.5e9, 0.005),
    ("DeepSeek-V3", 671e9, 0.005)])
def test_example_configs_match_published_sizes(name, published, tol):
    """The model cards' totals (DeepSeek-V3: 671B main model, without the 14B MTP module)."""
    config = json.loads((EXAMPLES / name / "config.json").read_text())
    assert abs(count_parameters(config) - published) / published <= tol


def test_active_parameters_of_moe_examples():
    """Qwen3-30B-A3B: 3.3B active; DeepSeek-V3: 37B active (36.6B + the 0.9B embedding)."""
    a3b = json.loads((EXAMPLES / "Qwen3-30B-A3B" / "config.json").read_text())
    v3 = json.loads((EXAMPLES / "DeepSeek-V3" / "config.json").read_text())
    assert abs(active_parameters(a3b) - 3.3e9) / 3.3e9 < 0.02
    assert abs(active_parameters(v3) - inventory(v3).embed - 36.6e9) / 36.6e9 < 0.005


def test_precision_resolution_agrees_with_training():
    from miles_ray.training import precision as prec

    for p in ("auto", "fp32", "bf16_mixed", "bf16", "fp8_unified"):
        for dtype in ("float32", "bfloat16", "float16"):
            assert resolve_precision(p, dtype) == prec.resolve(p, dtype)


def _samples(n=4):
    return [Sample(i, i, "p", "1", [5 + i, 6, 7], response_ids=[8, 9 + i, 10]) for i in range(n)]


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _state_bytes(trainer) -> tuple[int, int, int]:
    """Device bytes of parameters, gradients and AdamW state (exp_avg, exp_avg_sq; the 0-dim step
    counters are not counted: they live on the CPU) of a real trainer after one step."""
    params = [p for p in trainer.model.parameters()]
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731 - FSDP2 shards are DTensors
    states = [local(v) for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    return _bytes(local(p) for p in params), _bytes(local(p.grad) for p in params), _bytes(states)


def _cfg(model_cache, **over):
    return load_config(None, [f"model.tiny_cache_dir={model_cache}", *(f"{k}={v}" for k, v in over.items())])


CASES = [("qwen3", "fp32", "float32"), ("qwen3", "bf16_mixed", "bfloat16"), ("qwen3", "bf16", "bfloat16"),
         ("qwen3", "fp8_unified", "bfloat16"), ("qwen3_moe", "fp32", "float32"), ("mixtral", "bf16_mixed", "bfloat16")]


@pytest.mark.parametrize("arch, precision, dtype", CASES)
def test_model_state_bytes_exact_after_a_real_step(arch, precision, dtype, model_cache):
    """One rank (full copies): the plan's parameter, gradient and optimizer bytes equal the real
    trainer's tensors after one AdamW step; the KL reference (kl_coef > 0) as many as the parameters."""
    from miles_ray.training.fsdp import PolicyTrainer

    extra = {"rollout.precision": "fp8"} if precision == "fp8_unified" else {}
    cfg = _cfg(model_cache, **{"model.path": f"tiny:{arch}", "model.dtype": dtype, "train.precision": precision,
                               "algorithm.kl_coef": 0.1, **extra})
    trainer = PolicyTrainer(cfg.model.path, cfg.train, cfg.algorithm, dtype, model_cache)
    trainer.sft_step(_samples())
    model = read_model_config(cfg.model.path, model_cache)
    rank = policy_rank(cfg, inventory(model), model)
    assert _state_bytes(trainer) == (parameter_bytes(rank), gradient_bytes(rank), optimizer_bytes(rank))
    names = [i.name for i in memory_plan(cfg, model).roles["trainer"]]
    assert "reference model (kl_coef > 0)" in names
    assert _bytes(trainer.ref.parameters()) == parameter_bytes(rank)


def test_colocated_phases_and_biggest_item(model_cache):
    """Colocated: the optimizer is offloaded while engines run, engine weights and KV cache are
    released while the trainer runs; the refusal names the biggest item of the fullest phase."""
    cfg = _cfg(model_cache, **{"cluster.colocate": True, "cluster.use_gpu": True, "cluster.gpu_memory_gib": 0.5})
    plan = memory_plan(cfg, read_model_config(cfg.model.path, model_cache))
    gpu = plan.gpus[0]
    rollout = {i.name for _, i in gpu.resident("rollout")}
    train = {i.name for _, i in gpu.resident("train")}
    assert "optimizer state (AdamW)" in train - rollout
    assert any(n.startswith("weights") for n in rollout - train)
    assert not plan.fits and "biggest item" in plan.problem() and "gpu_memory_gib=0.5" in plan.problem()
    role, item = gpu.biggest()
    assert f"{role} {item.name}" in plan.problem() and item.knob in plan.problem()
    assert memory_plan(_cfg(model_cache), read_model_config("tiny:qwen3", model_cache)).fits


def test_plan_reads_a_folder_holding_only_config_json(tmp_path):
    (tmp_path / "config.json").write_text((EXAMPLES / "Qwen3-8B" / "config.json").read_text())
    assert count_parameters(read_model_config(str(tmp_path))) == 8_190_735_360


def _cli(argv, capsys):
    from jobs import cli

    rc = cli.main(argv)
    return rc, capsys.readouterr()


def test_cli_plan_prints_tables_and_verdict(capsys):
    rc, out = _cli(["plan", str(ROOT / "examples" / "plan_8xH100.yaml")], capsys)
    assert rc == 0, out.err
    for text in ("trainer (one GPU)", "engine (one GPU)", "colocated (configured) placement",
                 "disaggregated placement", "verdict: fits"):
        assert text in out.out
    rc, out = _cli(["plan", str(ROOT / "examples" / "plan_8xH100.yaml"),
                    f"model.path={EXAMPLES / 'DeepSeek-V3'}"], capsys)
    assert rc == 1 and "verdict: does NOT fit" in out.out


def _train_argv(model_cache, tmp_path, *extra):
    return ["train", "model.path=tiny:qwen3", f"model.tiny_cache_dir={model_cache}", f"output_dir={tmp_path}",
            "cluster.use_gpu=true", "cluster.gpu_memory_gib=0.01", *extra]


def test_train_refuses_a_gpu_plan_that_does_not_fit(model_cache, tmp_path, capsys):
    ray = pytest.importorskip("ray")
    rc, out = _cli(_train_argv(model_cache, tmp_path), capsys)
    lines = out.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: memory plan:"), out.err
    assert "biggest item" in lines[0] and "to shrink it:" in lines[0]
    assert not ray.is_initialized() and not (tmp_path / "config.yaml").exists()  # before anything started


def test_force_starts_anyway_and_cpu_runs_skip_the_plan(model_cache, tmp_path, capsys):
    """--force: past the plan, the run goes on to its next check (here: a missing data file, so no
    actor starts); a CPU run never consults the plan, however small gpu_memory_gib is."""
    ray = pytest.importorskip("ray")
    missing = f"data.source={tmp_path / 'missing.jsonl'}"
    for argv in (_train_argv(model_cache, tmp_path, missing, "--force"),
                 [*_train_argv(model_cache, tmp_path, missing), "cluster.use_gpu=false"]):
        rc, out = _cli(argv, capsys)
        errors = [line for line in out.err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(errors) == 1 and "missing.jsonl" in errors[0], out.err
    assert not ray.is_initialized()


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
@pytest.mark.parametrize("scheme", ["fp8", "int4"])
def test_engine_weight_bytes_match_a_quantized_engine_model(arch, scheme, model_cache):
    """In-process engines: the bytes of a real quantized engine model (routed experts included:
    miles_ray/quant/experts.py quantizes transformers 5's fused 3-D expert parameters)."""
    from miles_ray.models import load_model
    from miles_ray.plan.engine import weight_bytes
    from miles_ray.quant.modules import quantize_engine_model

    model = load_model(f"tiny:{arch}", "float32", model_cache)
    quantize_engine_model(model, scheme)
    real = _bytes(model.parameters()) + _bytes(b for n, b in model.named_buffers() if not n.endswith("inv_freq"))
    config = read_model_config(f"tiny:{arch}", model_cache)
    assert weight_bytes(inventory(config), scheme, "float32") == real
