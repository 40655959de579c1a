"""FP8 / INT4 on MoE experts (transformers 5's fused 3-D expert parameters): engine, QAT, sync, export."""
import json

import pytest
import torch

from miles_ray.config import AlgorithmConfig, TrainConfig
from miles_ray.models.loading import load_model
from miles_ray.quant import formats as fmt
from miles_ray.quant.modules import fake_quantize_model, quantizable, quantize_engine_model
from miles_ray.rollout import SamplingParams
from miles_ray.rollout.native import NativeEngine
from miles_ray.training.fsdp import PolicyTrainer
from miles_ray.weights import to_buckets

REQS = [{"prompt": f"What is {i}+{(3 * i) % 10}?", "label": "", "prompt_index": i, "group_id": i} for i in range(4)]


def _moe(model_cache):
    return load_model("tiny:qwen3_moe", "float32", model_cache)


def _experts(model):
    return model.model.layers[0].mlp.experts


def test_quantizable_names_every_expert_tensor(model_cache):
    model = _moe(model_cache)
    names = quantizable(model)
    experts = [n for n in names if ".experts." in n]
    assert experts == [f"model.layers.{i}.mlp.experts.{w}" for i in range(2) for w in ("gate_up_proj", "down_proj")]
    expert_params = {k for k in model.state_dict() if ".experts." in k}
    assert set(experts) == expert_params  # every expert parameter is quantized (coverage 1.0)
    assert not any(".gate" in n and "gate_up" not in n and "gate_proj" not in n for n in names)  # routers stay


@pytest.mark.parametrize("scheme", ["fp8", "int4"])
def test_engine_experts_compute_with_the_trainers_fake_quantized_weights(model_cache, scheme):
    torch.manual_seed(0)
    engine_model, trainer_model = _moe(model_cache), _moe(model_cache)
    dense = _experts(_moe(model_cache))
    assert quantize_engine_model(engine_model, scheme) == 8 + 4 and fake_quantize_model(trainer_model, scheme) == 12
    served, trained = _experts(engine_model), _experts(trainer_model)
    want = torch.float8_e4m3fn if scheme == "fp8" else torch.uint8
    assert served.gate_up_proj.dtype == want and served.gate_up_proj_scale.shape[0] == 8
    hidden, index = torch.randn(6, 128), torch.tensor([[0, 3], [1, 2], [7, 3], [5, 4], [6, 0], [2, 1]])
    weights = torch.softmax(torch.randn(6, 2), -1)
    out_e, out_t, out_d = served(hidden, index, weights), trained(hidden, index, weights), dense(hidden, index, weights)
    assert torch.allclose(out_e, out_t, atol=1e-6) and not torch.allclose(out_e, out_d, atol=1e-6)
    out_t.sum().backward()  # straight-through: the fp32 master parameters get gradients
    assert trained.gate_up_proj.grad is not None and trained.gate_up_proj.grad.abs().sum() > 0
    assert set(dict(trained.named_parameters())) == {"gate_up_proj", "down_proj"}  # names unchanged


@pytest.mark.parametrize("scheme,train", [("fp8", {"precision": "fp8_unified"}), ("int4", {"qat": "int4"})])
def test_moe_quantized_sync_and_unified_training(model_cache, scheme, train):
    engine = NativeEngine("tiny:qwen3_moe", tiny_cache_dir=model_cache, seed=0, quantization=scheme)
    trainer = PolicyTrainer("tiny:qwen3_moe", TrainConfig(**train), AlgorithmConfig(), tiny_cache_dir=model_cache,
                            engine_quant=scheme)
    state = trainer.engine_state()
    key = "model.layers.1.mlp.experts.down_proj"
    assert state[key].dtype in (torch.float8_e4m3fn, torch.uint8) and key + "_scale" in state
    assert engine.weights.load_buckets(to_buckets(state, 2), 2) == 2  # every expert buffer arrived (checked)
    samples = engine.generate(REQS, 2, SamplingParams(8))
    diffs = [abs(a - b) for s, lp in zip(samples, trainer.compute_logprobs(samples)) for a, b in zip(s.response_logprobs, lp)]
    if scheme == "int4":  # weight-only everywhere: the trainer reproduces the served numbers up to float noise
        assert max(diffs) < (1e-4 if not torch.cuda.is_available() else 1e-2)
    else:  # FP8 linears also quantize activations per token: close, not exact
        assert sum(diffs) / len(diffs) < 1e-2


def test_w4a16_export_of_a_moe_writes_per_expert_linears(model_cache, tmp_path):
    from miles_ray.quant.export import load_w4a16

    trainer = PolicyTrainer("tiny:qwen3_moe", TrainConfig(qat="int4"), AlgorithmConfig(), tiny_cache_dir=model_cache,
                            engine_quant="int4")
    trainer.save_w4a16(str(tmp_path / "w4a16"))
    cfg = json.loads((tmp_path / "w4a16" / "config.json").read_text())["quantization_config"]
    assert cfg["ignore"] == ["lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    decoded, master = load_w4a16(tmp_path / "w4a16"), trainer.full_state_dict()
    gate_up = master["model.layers.1.mlp.experts.gate_up_proj"]
    for e in (0, 7):
        gate, up = fmt.qdq_weight(gate_up[e], "int4").chunk(2, dim=0)
        assert torch.equal(decoded[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"], gate)
        assert torch.equal(decoded[f"model.layers.1.mlp.experts.{e}.up_proj.weight"], up)
        down = master["model.layers.1.mlp.experts.down_proj"][e]
        assert torch.equal(decoded[f"model.layers.1.mlp.experts.{e}.down_proj.weight"], fmt.qdq_weight(down, "int4"))
    assert not any("gate_up_proj" in k for k in decoded)
    assert decoded["model.layers.0.mlp.gate.weight"].dtype == torch.bfloat16  # the router, unquantized
