"""Low precision: FP8 blocks and INT4 groups, engines serving them, trainers reproducing them."""
import json

import pytest
import torch

from miles_ray.config import AlgorithmConfig, TrainConfig, load_config
from miles_ray.quant import formats as fmt
from miles_ray.quant.modules import FakeQuantLinear, QuantLinear, quantizable, quantize_state
from miles_ray.rollout.native import NativeEngine
from miles_ray.rollout import SamplingParams
from miles_ray.training.fsdp import PolicyTrainer
from miles_ray.weights import to_buckets

REQS = [{"prompt": f"What is {i % 10}+{(3 * i) % 10}?", "label": "", "prompt_index": i, "group_id": i} for i in range(8)]


def test_fp8_blocks_and_activation_groups():
    torch.manual_seed(0)
    w = torch.randn(300, 260) * torch.logspace(-3, 1, 260)  # columns of very different magnitudes
    q, scale = fmt.fp8_quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and scale.shape == (3, 3)
    back = fmt.fp8_dequantize_weight(q, scale)
    for i in range(3):  # each 128 x 128 block within e4m3's relative precision of its own amax
        for j in range(3):
            blk = (slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1)))
            assert (back[blk] - w[blk]).abs().max() <= w[blk].abs().max() * 2 ** -4 + 1e-12
    x = torch.randn(4, 260)
    xq = fmt.fp8_qdq_activation(x)
    assert xq.shape == x.shape and (xq - x).abs().max() <= x.abs().max() * 2 ** -4
    assert torch.equal(fmt.fp8_qdq_activation(xq), xq)  # idempotent: already on the grid


def test_int4_groups_pack_and_bounds():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    q, scale = fmt.int4_quantize_weight(w)
    assert q.min() >= -8 and q.max() <= 7 and scale.dtype == torch.bfloat16 and scale.shape == (64, 2)
    packed = fmt.int4_pack(q)
    assert packed.dtype == torch.uint8 and packed.shape == (64, 128) and torch.equal(fmt.int4_unpack(packed), q)
    err = (fmt.int4_dequantize(q, scale) - w).abs().view(64, 2, 128).amax(-1)
    amax = w.abs().view(64, 2, 128).amax(-1)
    assert (err <= scale.float() * 0.5 + amax * 2 ** -7).all()  # half a step (+ the bf16 scale's rounding)
    with pytest.raises(ValueError, match="divisible by 128"):
        fmt.int4_quantize_weight(torch.randn(4, 100))


@pytest.mark.parametrize("scheme", ["fp8", "int4"])
def test_engine_linear_equals_trainer_fake_quant_and_gradients_pass_through(scheme):
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 128)
    engine, trainer = QuantLinear(lin, scheme), FakeQuantLinear(lin, scheme)
    x = torch.randn(5, 256, requires_grad=True)
    y = trainer(x)
    assert torch.equal(engine(x.detach()), y.detach())  # the numbers rollout serves are the ones trained on
    y.sum().backward()
    w_q = fmt.qdq_weight(lin.weight.detach(), scheme)
    assert torch.allclose(x.grad, torch.ones(5, 128) @ w_q, atol=1e-5)  # straight through the quantizer
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("scheme,train", [("fp8", {"precision": "fp8_unified"}), ("int4", {"qat": "int4"})])
def test_quantized_sync_and_unified_training(model_cache, scheme, train):
    engine = NativeEngine("tiny:qwen3", tiny_cache_dir=model_cache, seed=0, quantization=scheme)
    means = {}
    for name, extra in (("full", {}), ("unified", train)):
        trainer = PolicyTrainer("tiny:qwen3", TrainConfig(**extra), AlgorithmConfig(), tiny_cache_dir=model_cache,
                                engine_quant=scheme)
        state = trainer.engine_state()
        names = quantizable(trainer.module)
        assert len(names) == 14 and state[f"{names[0]}.weight"].dtype in (torch.float8_e4m3fn, torch.uint8)
        assert engine.weights.load_buckets(to_buckets(state, 3), 3) == 3  # every buffer arrived (checked)
        samples = engine.generate(REQS, 2, SamplingParams(10))
        diffs = [abs(a - b) for s, lp in zip(samples, trainer.compute_logprobs(samples))
                 for a, b in zip(s.response_logprobs, lp)]
        means[name] = sum(diffs) / len(diffs)
    assert means["unified"] < 0.2 * means["full"]
    if scheme == "int4":  # weight-only: training reproduces the served numbers up to float noise
        assert means["unified"] < (1e-5 if not torch.cuda.is_available() else 1e-3)  # CUDA decode != full forward


def test_quantized_payload_is_smaller():
    torch.manual_seed(0)
    state = {"model.layers.0.mlp.up_proj.weight": torch.randn(512, 256), "model.norm.weight": torch.ones(256)}
    for scheme, bound in (("fp8", 0.51), ("int4", 0.27)):
        q = quantize_state(state, ["model.layers.0.mlp.up_proj"], scheme)
        sent = sum(v.numel() * v.element_size() for k, v in q.items() if "up_proj" in k)
        assert sent / (512 * 256 * 2) < bound and torch.equal(q["model.norm.weight"], state["model.norm.weight"])


def test_config_guards():
    with pytest.raises(ValueError, match="set rollout.precision=fp8"):
        load_config(None, ["train.precision=fp8_unified"])
    with pytest.raises(ValueError, match="set rollout.precision=int4"):
        load_config(None, ["train.qat=int4"])
    with pytest.raises(ValueError, match="does not combine with engines over HTTP"):
        load_config(None, ["rollout.precision=fp8", "rollout.backend=native", "rollout.serve_http=true"])


def test_w4a16_export_decodes_to_the_trained_values(model_cache, tmp_path):
    """The compressed-tensors checkpoint of an INT4-QAT policy decodes (q * scale, as vLLM / SGLang
    do) to exactly the fake-quantized weights the trainer computed with."""
    from miles_ray.quant.export import load_w4a16

    trainer = PolicyTrainer("tiny:qwen3", TrainConfig(qat="int4", lr=1e-2), AlgorithmConfig(), tiny_cache_dir=model_cache,
                            engine_quant="int4")
    trainer.sft_step([s for s in _sft(trainer)], lr=1e-2)  # move off the initial weights
    trainer.save_w4a16(str(tmp_path / "w4a16"))
    cfg = json.loads((tmp_path / "w4a16" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and cfg["config_groups"]["group_0"]["weights"]["group_size"] == 128
    decoded = load_w4a16(tmp_path / "w4a16")
    master = trainer.full_state_dict()
    for name in quantizable(trainer.module):
        want = fmt.qdq_weight(master[f"{name}.weight"], "int4")
        assert torch.equal(decoded[f"{name}.weight"], want), name
    assert torch.equal(decoded["model.norm.weight"], master["model.norm.weight"].to(torch.bfloat16))


def _sft(trainer):
    from miles_ray.sample import Sample

    return [Sample(i, i, "p", "1", [5, 6, 7, 8], response_ids=[9, 10, 11]) for i in range(4)]


def test_fp8_backend_errors_name_the_fix():
    from miles_ray.errors import UserError
    from miles_ray.quant.kernels import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "dequant"
    with pytest.raises(UserError, match="needs a GPU; on cpu FP8 runs as dequant"):
        resolve_backend("scaled_mm", torch.device("cpu"))
