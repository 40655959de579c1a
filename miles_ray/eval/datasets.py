"""Held-out evaluation sets, loaded with the training data loaders (:func:`miles_ray.data.load_prompts`:
the same row validation, chat template and prompt-length limit as ``data``).

Invariant: evaluation requests carry negative group ids (``-1, -2, ...``); training group ids
are >= 0, so an evaluation sample can never be mistaken for (or counted as) a training group.
"""
from __future__ import annotations

from dataclasses import dataclass

from miles_ray.data import PromptItem, check_source, load_prompts
from miles_ray.data.synthetic import SYNTHETIC_TASKS, source_function


@dataclass
class EvalSet:
    spec: object  # the EvalDataset section
    items: list[PromptItem]

    @property
    def name(self) -> str:
        return self.spec.name


def _data_config(cfg, spec):
    """The run's ``data`` section with the set's source and columns (template, length limit kept)."""
    return cfg.data.model_copy(update={"source": spec.source, "prompt_key": spec.prompt_key,
                                       "label_key": spec.label_key, "num_synthetic": spec.num_synthetic,
                                       "synthetic_max_operand": spec.synthetic_max_operand})


def load_eval_sets(cfg, tokenizer) -> list[EvalSet]:
    """Every set of ``cfg.eval.datasets``: its first ``max_prompts`` usable rows, in file order
    (synthetic sets: generated with the set's ``seed``, default the run's seed + 1)."""
    out = []
    for spec in cfg.eval.datasets:
        seed = cfg.seed + 1 if spec.seed is None else spec.seed
        field = f"eval.datasets[{spec.name}].source"
        items, _ = load_prompts(_data_config(cfg, spec), tokenizer, seed=seed, field=field)
        out.append(EvalSet(spec, items[:spec.max_prompts]))
    return out


def eval_requests(items: list[PromptItem], first: int = 0) -> list[dict]:
    """Generation requests (as :func:`jobs.steps.requests_for`) with group ids ``-(first + 1)``,
    ``-(first + 2)``, ...: never a training group id."""
    return [{"prompt": p.prompt, "label": p.label, "prompt_index": p.index, "group_id": -(first + 1 + j),
             "messages": p.messages} for j, p in enumerate(items)]


def config_problem(cfg) -> str:
    """Why the ``eval`` section cannot run with this config ("" when it can)."""
    for spec in cfg.eval.datasets:
        if spec.source.startswith("synthetic:") and spec.source.split(":", 1)[1] not in SYNTHETIC_TASKS:
            return (f"eval.datasets[{spec.name}].source={spec.source!r}: unknown synthetic task; choose one of "
                    f"{['synthetic:' + t for t in sorted(SYNTHETIC_TASKS)]}")
        if source_function(spec.source) is not None:  # a data source plug-in: a PluginError if unusable
            check_source(spec.source, f"eval.datasets[{spec.name}].source")
        elif not spec.source.endswith((".jsonl", ".json", ".parquet")):
            return (f"eval.datasets[{spec.name}].source={spec.source!r}: use a .jsonl / .parquet file, "
                    "synthetic:<task> or a data source 'pkg.module:function'")
    return ""
