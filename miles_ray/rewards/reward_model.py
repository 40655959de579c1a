"""A sequence-classification reward model (HF ``AutoModelForSequenceClassification``, one label):
a tiny random one written offline for tests, and :class:`RewardModelScorer`, which the Ray Serve
deployment (:mod:`actors.reward_service`) runs on batches of requests.

Invariants (tests/system/rewards/test_reward_services.py):
- a text's score does not depend on the batch it is scored in (right padding: a causal model's
  real tokens never attend to the pads, and the score is read at the last real token);
- the tiny model is written once per cache folder, atomically (racing writers are safe).

Pure torch/transformers: no Ray here.
"""
from __future__ import annotations

from pathlib import Path

from miles_ray.errors import UserPathError

TINY_REWARD_ARCHS = ("qwen3", "llama")


def write_tiny_reward_model(out_dir: str | Path, arch: str = "qwen3", seed: int = 0, hidden: int = 64,
                            layers: int = 2) -> Path:
    """A random ``<Arch>ForSequenceClassification`` (``num_labels=1``) with the tiny byte-level
    tokenizer of :mod:`miles_ray.models.tiny`, saved to ``out_dir`` (written aside, then renamed)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from miles_ray.models.tiny import save_once, tiny_model_config, train_tokenizer

    if arch not in TINY_REWARD_ARCHS:
        raise ValueError(f"unknown tiny reward-model arch '{arch}'; choose one of {TINY_REWARD_ARCHS}")
    out = Path(out_dir)
    tokenizer = train_tokenizer(seed)
    tokenizer.padding_side = "right"  # see the module invariant
    config = tiny_model_config(arch, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, hidden, layers)
    config.num_labels = 1
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    return save_once(out, model, tokenizer)


def resolve_reward_model_path(spec: str | None, cache_dir: str = "runs/_models") -> str:
    """``reward.model_path`` -> an absolute folder: ``tiny`` / ``tiny:<arch>`` are written once into
    ``cache_dir``; anything else must be an HF folder with a ``config.json``."""
    if not spec:
        raise UserPathError("reward.fn=reward_model needs reward.model_path (an HF sequence-classification folder, "
                            "or 'tiny' for a random one written offline)")
    if spec == "tiny" or spec.startswith("tiny:"):
        arch = spec.partition(":")[2] or "qwen3"
        folder = Path(cache_dir) / f"tiny-reward-{arch}"
        if not (folder / "config.json").is_file():
            write_tiny_reward_model(folder, arch=arch)
        return str(folder.resolve())
    folder = Path(spec)
    if not (folder / "config.json").is_file():
        raise UserPathError(f"reward.model_path='{spec}' is not a model folder (no config.json); use an HF "
                            "AutoModelForSequenceClassification folder or 'tiny[:qwen3|llama]'")
    return str(folder.resolve())


def reward_text(tokenizer, prompt: str, response: str) -> str:
    """What the model reads: the chat template's user/assistant turns when the tokenizer has one
    (trained reward models, e.g. Skywork-Reward, expect it), else ``prompt + response``."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False)
    return prompt + response


class RewardModelScorer:
    """Loads a sequence-classification model once and scores batches of (prompt, response) pairs."""

    def __init__(self, path: str, dtype: str = "float32", max_length: int = 2048, device: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=getattr(torch, dtype))
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()
        self.max_length = max_length

    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        """One float per (prompt, response): the model's single logit at the last real token."""
        if not pairs:
            return []
        texts = [reward_text(self.tokenizer, p, r) for p, r in pairs]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length,
                             add_special_tokens=False)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with self.torch.inference_mode():
            logits = self.model(**enc).logits  # [batch, 1]
        return [float(x) for x in logits[:, 0].float().cpu()]
