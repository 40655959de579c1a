"""Evaluation on held-out sets, the pure part: loading the sets (with the training data loaders),
the schedule (which steps evaluate) and the metrics (pass@k, mean reward). The Ray side - which
engines generate, where the rows go - is :mod:`jobs.evaluation`."""
from miles_ray.eval.datasets import EvalSet, config_problem, eval_requests, load_eval_sets  # noqa: F401
from miles_ray.eval.metrics import dataset_metrics, overall_metrics, pass_at_k  # noqa: F401
from miles_ray.eval.schedule import EvalSchedule, dedicated_engines  # noqa: F401
