"""Prompt data: file loading with row validation, synthetic tasks, a resumable sampler."""
from miles_ray.data.dataset import DataError, PromptItem, PromptSampler, read_rows, validate_rows  # noqa: F401
from miles_ray.data.synthetic import synthetic_rows  # noqa: F401


def load_prompts(cfg, tokenizer, seed: int = 0):
    """Load and validate the prompts named by a DataConfig. Returns (items, report)."""
    if cfg.source.startswith("synthetic:"):
        rows = synthetic_rows(cfg.source.split(":", 1)[1], cfg.num_synthetic, cfg.synthetic_max_operand, seed)
        prompt_key, label_key = "prompt", "label"
    else:
        rows, prompt_key, label_key = read_rows(cfg.source), cfg.prompt_key, cfg.label_key
    return validate_rows(rows, tokenizer, prompt_key, label_key, cfg.apply_chat_template,
                         cfg.max_prompt_tokens, source=cfg.source)
