"""SGLang-specific glue (GPU only, imported lazily inside the engine actor).

The server is started by :func:`miles_ray.rollout.launch.launch_server` with backend ``sglang``;
generation, health, abort, pause and memory release/resume use the same SGLang-native endpoints as
our native server. Only the weight-update payload differs: SGLang's
``/update_weights_from_tensor`` takes named tensors serialized with its own
``MultiprocessingSerializer``. NOT VERIFIED on a GPU yet (no GPU in the sessions so far).
"""
from __future__ import annotations

from miles_ray.weights.buckets import iter_tensors


def update_weights_from_buckets(client, buckets: list, version: int) -> int:
    from sglang.srt.utils import MultiprocessingSerializer  # GPU extra only

    named = [(name, tensor.cuda()) for b in buckets for name, tensor in iter_tensors(b)]
    body = {"serialized_named_tensors": [MultiprocessingSerializer.serialize(named, output_str=True)],
            "load_format": None, "flush_cache": True, "weight_version": str(version)}
    r = client.http.post(f"{client.url}/update_weights_from_tensor", json=body)
    if r.status_code >= 400 or not r.json().get("success", False):
        raise RuntimeError(f"sglang weight update failed: HTTP {r.status_code} {r.text[:300]}")
    return version


def speculative_args(draft_cfg, target_spec: str, out_dir: str, dtype: str = "bfloat16",
                     tiny_cache_dir: str = "runs/_models") -> list[str]:
    """``sglang.launch_server`` flags for speculative rollout with our draft (SGLang's STANDALONE
    mode: a separate small draft model). A ``layers:N`` draft is written as an HF folder first.

    SGLang's weight-update endpoints push the *target's* tensors to the draft worker too, which is
    wrong for a separate draft, so ``--disable-draft-model-update`` is set and the draft stays as
    launched: with SGLang the draft is frozen (draft.online=false). NOT VERIFIED on a GPU."""
    from pathlib import Path

    from miles_ray.models.draft import build_draft
    from miles_ray.models.loading import load_tokenizer

    folder = Path(out_dir) / "draft-init"
    if not (folder / "config.json").is_file():
        build_draft(draft_cfg.path, target_spec, dtype, tiny_cache_dir).save_pretrained(folder)
        load_tokenizer(target_spec, tiny_cache_dir).save_pretrained(folder)
    k = draft_cfg.num_tokens
    return ["--speculative-algorithm", "STANDALONE", "--speculative-draft-model-path", str(folder),
            "--speculative-num-steps", str(k), "--speculative-eagle-topk", "1",
            "--speculative-num-draft-tokens", str(k + 1), "--disable-draft-model-update"]
