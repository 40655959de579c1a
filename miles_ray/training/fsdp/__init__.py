"""The FSDP2/DDP backend: transformers models (policy, critic, draft) and their sharded checkpoints."""
from miles_ray.training.fsdp.trainer import PolicyTrainer  # noqa: F401
