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
