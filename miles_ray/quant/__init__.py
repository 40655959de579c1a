"""Low precision: FP8 block quantization (DeepSeek-V3 / Miles style) and INT4 W4A16 groups, for
rollout (quantized weights sent and served) and training (quantize-dequantize with a straight-
through gradient, so training sees the numbers rollout serves)."""
