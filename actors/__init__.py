"""Thin Ray actor wrappers around miles_ray objects (no algorithm logic here)."""
from actors.buffer import BufferActor  # noqa: F401
from actors.draft import DraftTrainerActor  # noqa: F401
from actors.group import RankGroup  # noqa: F401
from actors.reward import RewardWorker  # noqa: F401
from actors.rollout import RolloutEngineActor  # noqa: F401
from actors.router import RouterActor  # noqa: F401
from actors.trainer import CriticActor, TrainerActor  # noqa: F401
