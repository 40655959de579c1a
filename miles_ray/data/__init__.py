"""Prompt data: file loading with row validation, synthetic tasks, a resumable sampler."""
from miles_ray.data.dataset import DataError, PromptItem, PromptSampler, read_rows, validate_rows  # noqa: F401
from miles_ray.data.synthetic import DATA_SOURCES, SYNTHETIC_TASKS, source_function, synthetic_rows  # noqa: F401


def check_source(source: str, field: str = "data.source") -> None:
    """Fail now (config time) on a ``synthetic:<name>`` or import-path source that cannot be used."""
    if (name := source_function(source)) is not None:
        DATA_SOURCES.check(name, field)


def load_prompts(cfg, tokenizer, seed: int = 0, field: str = "data.source"):
    """Load and validate the prompts named by a DataConfig. Returns (items, report). A synthetic
    task's rows use the keys prompt / label; an import-path source's rows ``cfg``'s keys."""
    if (name := source_function(cfg.source)) is not None:
        rows = synthetic_rows(name, cfg.num_synthetic, cfg.synthetic_max_operand, seed, field)
        synthetic = cfg.source.startswith("synthetic:")
        prompt_key, label_key = ("prompt", "label") if synthetic else (cfg.prompt_key, cfg.label_key)
    else:
        rows, prompt_key, label_key = read_rows(cfg.source), cfg.prompt_key, cfg.label_key
    return validate_rows(rows, tokenizer, prompt_key, label_key, cfg.apply_chat_template,
                         cfg.max_prompt_tokens, source=cfg.source)
