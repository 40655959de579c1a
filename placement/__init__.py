"""Placement: resource spec -> placement groups and bundle assignments."""
from placement.plan import Assignment, GroupSpec, PlacementPlan, check_fits, plan_placement  # noqa: F401
