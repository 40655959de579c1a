"""Algorithms: advantage estimators, policy losses, KL estimators, loss aggregations (registries)."""
from miles_ray.algorithms.registry import (  # noqa: F401
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    Registry,
)
from miles_ray.algorithms import advantages as _advantages  # noqa: F401  (registers)
from miles_ray.algorithms import losses as _losses  # noqa: F401  (registers)
from miles_ray.algorithms.advantages import AdvantageInputs, compute_advantages, scalar_advantages  # noqa: F401
from miles_ray.algorithms.assign import assign_advantages  # noqa: F401
