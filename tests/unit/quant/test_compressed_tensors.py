"""The INT4 W4A16 export read by the ``compressed-tensors`` package itself (the library vLLM and
SGLang load such checkpoints with): its own decompressor gives exactly the values our QAT trained,
for a dense model and a MoE (experts exported per expert, routers listed in ``ignore``).

compressed-tensors multiplies q x scale in the scale's dtype (bf16), our QAT in fp32: values are
compared after rounding ours to the decompressor's dtype, where they are bit-identical."""
import json

import pytest
from safetensors.torch import load_file

from miles_ray.config import AlgorithmConfig, TrainConfig
from miles_ray.quant.export import load_w4a16
from miles_ray.training.fsdp import PolicyTrainer

ct = pytest.importorskip("compressed_tensors")


def _decompressed(folder):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    group = {k: v for k, v in qc["config_groups"]["group_0"].items() if k != "targets"}
    scheme = QuantizationScheme(targets=["Linear"], **group)
    tensors = load_file(str(folder / "model.safetensors"))
    out = {}
    for key in tensors:
        if key.endswith(".weight_packed"):
            base = key[: -len(".weight_packed")]
            sd = {k: tensors[f"{base}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape")}
            out[f"{base}.weight"] = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
    return qc, out


@pytest.mark.parametrize("spec", ["tiny:qwen3", "tiny:qwen3_moe"])
def test_compressed_tensors_decompresses_our_export_exactly(spec, model_cache, tmp_path):
    trainer = PolicyTrainer(spec, TrainConfig(qat="int4"), AlgorithmConfig(), tiny_cache_dir=model_cache,
                            engine_quant="int4")
    folder = tmp_path / "w4a16"
    trainer.save_w4a16(str(folder))
    qc, theirs = _decompressed(folder)
    ours = load_w4a16(folder)
    assert theirs, "no quantized Linear in the export"
    worst = max((w.float() - ours[name].to(w.dtype).float()).abs().max().item() for name, w in theirs.items())
    assert worst == 0.0  # ct_decompress_max_abs
    if spec.endswith("moe"):
        assert any(".experts." in name for name in theirs)  # experts quantized, per expert
        assert all(name.endswith(".mlp.gate") for name in qc["ignore"] if "layers" in name)  # routers stay dense
