"""SGLang-specific glue (GPU only, imported lazily inside the engine actor).

The server is started by :func:`miles_ray.rollout.http.launch.launch_server` with backend ``sglang``;
every endpoint, weight updates included, is spoken in SGLang's own formats by
:class:`miles_ray.rollout.http.engine.HttpEngine` (verified against our server's strict mode,
:mod:`miles_ray.rollout.sglang.api`; NOT VERIFIED against a real SGLang yet, see
docs/sglang_http.md). What is left here: the speculative-decoding launch flags.
"""
from __future__ import annotations


def speculative_args(draft_cfg, target_spec: str, out_dir: str, dtype: str = "bfloat16",
                     tiny_cache_dir: str = "runs/_models") -> list[str]:
    """``sglang.launch_server`` flags for speculative rollout with our draft (SGLang's STANDALONE
    mode: a separate small draft model). A ``layers:N`` draft is written as an HF folder first.

    The draft stays as launched (draft.online=false): SGLang has no flag for that (issue 25 item 4).
    0.5.5 updates the target worker only (managers/scheduler_update_weights_mixin.py:79
    ``self.tp_worker.update_weights_from_tensor``); 0.5.23 updates ``selector="all"`` runners by
    default (io_struct.py:2045, weight_updater.py:178 ``_select_runners``), so the client sends
    ``selector="target"`` there (:class:`miles_ray.rollout.sglang.client.EngineClient`). NOT VERIFIED
    on a GPU."""
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
            "--speculative-num-draft-tokens", str(k + 1)]
