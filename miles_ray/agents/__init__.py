"""Multi-turn rollout: custom generate functions (``rollout.fn``), environments with tools, and the
token-exact trajectories (``Sample.loss_mask``) they produce. Pure library; the engine actors run
it through :class:`miles_ray.agents.runner.AgentEngine`."""
from miles_ray.agents.env import ENVIRONMENTS, Environment, Observation, StepResult, make_env  # noqa: F401
from miles_ray.agents.trajectory import Trajectory  # noqa: F401
from miles_ray.agents import calculator as _calculator  # noqa: F401  (registers "calculator")
from miles_ray.agents import multi_turn as _multi_turn  # noqa: F401  (registers "multi_turn")
