"""Registries that make algorithms pluggable (verl-style ``@REGISTRY.register(name)``)."""
from __future__ import annotations

from miles_ray.utils.registry import Registry

ADVANTAGE_ESTIMATORS = Registry("advantage estimator")
POLICY_LOSSES = Registry("policy loss")
LOSS_AGGREGATIONS = Registry("loss aggregation")
KL_ESTIMATORS = Registry("KL estimator")
