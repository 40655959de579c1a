"""Write a tiny random causal LM (Qwen3 / Qwen2 / Llama) plus an offline-trained byte-level BPE
tokenizer with a chat template to a folder. Used by tests and the demo.

    python -m miles_ray.models.tiny OUT_DIR [--arch qwen3|qwen2|llama] [--seed 0]
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
ARCHS = ("qwen3", "qwen2", "llama", "qwen3_moe", "mixtral")


def _corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ("what is the answer sum of plus minus times equals question compute number result "
             "user assistant system hello world please reply with a single integer").split()
    lines = []
    for _ in range(400):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"What is {a}+{b}? Answer: {a + b}")
        lines.append(" ".join(rng.choice(words) for _ in range(8)))
    return lines


def train_tokenizer(seed: int = 0, vocab_size: int = 512):
    """Byte-level BPE trained offline in well under a second; round-trips any UTF-8 text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<pad>",
        unk_token=None, padding_side="left", chat_template=CHAT_TEMPLATE,
    )


def _qwen3(common: dict, hidden: int):
    from transformers import Qwen3Config

    return Qwen3Config(head_dim=hidden // 4, **common)


def _qwen2(common: dict, hidden: int):
    from transformers import Qwen2Config

    return Qwen2Config(**common)


def _llama(common: dict, hidden: int):
    from transformers import LlamaConfig

    return LlamaConfig(**common)


def _qwen3_moe(common: dict, hidden: int):
    """8 experts, top-2, every layer sparse (HF Qwen3-MoE config)."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(head_dim=hidden // 4, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=hidden,
                          decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, **common)


def _mixtral(common: dict, hidden: int):
    from transformers import MixtralConfig

    return MixtralConfig(num_local_experts=8, num_experts_per_tok=2, **common)


TINY_CONFIGS = {"qwen3": _qwen3, "qwen2": _qwen2, "llama": _llama, "qwen3_moe": _qwen3_moe, "mixtral": _mixtral}


def tiny_model_config(arch: str, vocab_size: int, eos_id: int, pad_id: int, hidden: int = 128, layers: int = 2):
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None,
    )
    if arch not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny arch '{arch}'; choose one of {ARCHS}")
    return TINY_CONFIGS[arch](common, hidden)


def write_tiny_model(out_dir: str | Path, arch: str = "qwen3", seed: int = 0, hidden: int = 128, layers: int = 2) -> Path:
    """Create the tokenizer and a randomly initialised model and save both to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    tokenizer = train_tokenizer(seed)
    config = tiny_model_config(arch, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, hidden, layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return save_once(out, model, tokenizer)


def save_once(out: Path, model, tokenizer) -> Path:
    """Save ``model`` and ``tokenizer`` to ``out``: written aside, then renamed (safe for racing
    writers; a writer that loses the race drops its identical copy)."""
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first; its copy is identical (same seed)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--arch", default="qwen3", choices=ARCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    path = write_tiny_model(args.out_dir, args.arch, args.seed, args.hidden, args.layers)
    print(f"wrote tiny {args.arch} model and tokenizer to {path}")


if __name__ == "__main__":
    main()
