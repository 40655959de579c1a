"""Training backends. ``PolicyTrainer``: plain torch (AdamW, micro-batches, PPO/KL/SFT losses)."""
from miles_ray.training.trainer import PolicyTrainer  # noqa: F401
