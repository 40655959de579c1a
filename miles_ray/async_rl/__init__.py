"""Async off-policy training: staleness admission control and dynamic-sampling filters."""
from miles_ray.async_rl.filters import GROUP_FILTERS  # noqa: F401
from miles_ray.async_rl.staleness import StalenessController  # noqa: F401
from miles_ray.async_rl.order import AdmissionOrder  # noqa: F401
