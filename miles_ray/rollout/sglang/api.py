"""The request rules and response shapes of SGLang 0.5.x's native ``/generate``, derived from its
source (each rule cites file and function), shared by both modes of our server.

Requests (both modes): a body SGLang would refuse is refused with HTTP 400 naming the problem; so
is a field SGLang knows but this stand-in does not implement (with a non-default value), and an
unknown field (SGLang ignores unknown top-level fields; we refuse them so that a client bug
cannot pass silently). Lenient mode also accepts ``top_k=0`` (disabled, our old meaning) and
requests longer than the model's context (our engine has no such limit).

Responses: strict mode answers exactly SGLang's shapes (string ``weight_version``,
``finish_reason`` objects, ``output_token_logprobs`` triples); lenient mode adds
``weight_versions`` (per-token versions of partial rollout).
"""
from __future__ import annotations

import math

from miles_ray.rollout.types import SamplingParams


class BadRequest(ValueError):
    """Answered with HTTP 400 and this message."""


# python/sglang/srt/managers/io_struct.py, GenerateReqInput: its fields. Values are what the
# stand-in implements: None = any value, else the set of accepted values (SGLang's default first).
GENERATE_FIELDS = {
    "text": None, "input_ids": None, "sampling_params": None, "rid": None, "return_logprob": None,
    "logprob_start_len": (None, -1), "top_logprobs_num": (None, 0), "token_ids_logprob": (None,),
    "return_text_in_logprobs": (False,), "stream": (False,), "log_metrics": None, "return_hidden_states": (False,),
    "modalities": (None,), "session_params": (None,), "lora_path": (None,), "lora_id": (None,),
    "custom_logit_processor": (None,), "bootstrap_host": (None,), "bootstrap_port": (None,),
    "bootstrap_room": (None,), "bootstrap_pair_key": (None,), "data_parallel_rank": (None,),
    "input_embeds": (None,), "image_data": (None,), "video_data": (None,), "audio_data": (None,),
    "background": (False,), "conversation_id": None, "priority": (None,), "extra_key": (None,), "no_logs": None,
    "custom_labels": None, "return_bytes": (False,), "return_entropy": (False,), "return_routed_experts": None,
}

# python/sglang/srt/sampling/sampling_params.py, SamplingParams: its API fields (a key outside them
# makes SamplingParams(**sampling_params) raise TypeError in tokenizer_manager
# _get_sampling_params). Same convention: None = any value, else the accepted values.
SAMPLING_FIELDS = {
    "max_new_tokens": None, "stop": None, "stop_token_ids": None, "temperature": None, "top_p": None,
    "top_k": None, "min_p": None, "n": None, "ignore_eos": None, "min_new_tokens": (0,),
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "repetition_penalty": (1, 1.0),
    "stop_regex": (None,), "json_schema": (None,), "regex": (None,), "ebnf": (None,), "structural_tag": (None,),
    "skip_special_tokens": (True,), "spaces_between_special_tokens": (True,), "no_stop_trim": (False,),
    "custom_params": (None,), "stream_interval": None, "logit_bias": (None,), "sampling_seed": (None,),
}


def _check_fields(body: dict, fields: dict, what: str) -> None:
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise BadRequest(f"unknown {what} field(s) {unknown}; SGLang 0.5.x accepts {sorted(fields)}")
    for k, allowed in fields.items():
        # SamplingParams.__post_init__: None means "use the default" (sampling_params.py)
        if allowed is not None and k in body and body[k] is not None and body[k] not in allowed:
            raise BadRequest(f"{what} field '{k}'={body[k]!r} is not implemented by this SGLang stand-in "
                             f"(accepted: {[a for a in allowed if a is not None] or 'null'})")


def _num(d: dict, key: str, default, kind=float):
    v = d.get(key)
    if v is None:
        return default
    ok = isinstance(v, int) if kind is int else isinstance(v, (int, float))
    if not ok or isinstance(v, bool):
        raise BadRequest(f"sampling_params.{key} must be {kind.__name__}, got {v!r}")
    return v


def _str_list(v, key: str) -> list:
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise BadRequest(f"sampling_params.{key} must be a string or a list of strings")
    return items


def _int_list(v, key: str, high: int) -> list:
    if v is None:
        return []
    if not isinstance(v, list) or not all(type(t) is int and 0 <= t < high for t in v):
        raise BadRequest(f"sampling_params.{key} must be a list of token ids in [0, {high})")
    return v


def parse_sampling(sp, vocab_size: int, strict: bool) -> tuple[SamplingParams, int]:
    """(params, n) from a request's ``sampling_params``; rules of ``SamplingParams.verify``
    (python/sglang/srt/sampling/sampling_params.py) unless noted."""
    if sp is None:
        sp = {}
    if not isinstance(sp, dict):
        raise BadRequest("sampling_params must be an object (per-prompt lists are not implemented by the stand-in)")
    _check_fields(sp, SAMPLING_FIELDS, "sampling_params")
    temperature = _num(sp, "temperature", 1.0)
    if not math.isfinite(temperature) or temperature < 0:
        raise BadRequest(f"temperature must be a non-negative finite number, got {temperature}.")
    top_p = _num(sp, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise BadRequest(f"top_p must be in (0, 1], got {top_p}.")
    min_p = _num(sp, "min_p", 0.0)
    if not 0.0 <= min_p <= 1.0:
        raise BadRequest(f"min_p must be in [0, 1], got {min_p}.")
    top_k = _num(sp, "top_k", -1, int)  # __post_init__: None -> -1 -> whole vocabulary
    if top_k < 1 and top_k != -1 and not (top_k == 0 and not strict):
        raise BadRequest(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
    max_new = _num(sp, "max_new_tokens", 128, int)  # SamplingParams.max_new_tokens default 128
    if max_new < 0:
        raise BadRequest(f"max_new_tokens must be at least 0, got {max_new}.")
    n = _num(sp, "n", 1, int)
    if not 1 <= n <= 1024:
        raise BadRequest(f"n must be in [1, 1024], got {n}.")
    ignore_eos = sp.get("ignore_eos")
    if ignore_eos is not None and not isinstance(ignore_eos, bool):
        raise BadRequest("sampling_params.ignore_eos must be a boolean")
    params = SamplingParams(max_new, temperature, top_p, max(top_k, 0), min_p, _str_list(sp.get("stop"), "stop"),
                            _int_list(sp.get("stop_token_ids"), "stop_token_ids", vocab_size), bool(ignore_eos))
    return params, n


def _prompt_ids(body: dict, tokenizer, vocab_size: int) -> tuple[list, bool]:
    """Prompts and whether the request is a batch. tokenizer_manager ``_validate_inputs`` /
    GenerateReqInput ``_validate_inputs``: exactly one of text / input_ids."""
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise BadRequest("give exactly one of 'text' or 'input_ids'")
    if ids is not None:
        batched = isinstance(ids, list) and bool(ids) and isinstance(ids[0], list)
        prompts = ids if batched else [ids]
        ok = isinstance(ids, list) and all(isinstance(p, list) and p and all(type(t) is int and 0 <= t < vocab_size
                                                                             for t in p) for p in prompts)
        if not ok:
            raise BadRequest(f"input_ids must be a non-empty list (or list of lists) of token ids in [0, {vocab_size})")
        return prompts, batched
    batched = isinstance(text, list)
    texts = text if batched else [text]
    if not texts or not all(isinstance(t, str) for t in texts):
        raise BadRequest("text must be a string or a non-empty list of strings")
    return [tokenizer(t, add_special_tokens=False)["input_ids"] or [0] for t in texts], batched


def _rids(rid, batch: int, n: int) -> list[str] | None:
    """Request ids, one per output. GenerateReqInput ``_normalize_rid`` (io_struct.py): a batch
    takes a list of ``batch`` ids or a string expanded to ``<rid>_<i>``; "The specified rids
    length mismatch with the batch_size" otherwise. n>1 samples get ``_<k>`` suffixes. None when
    the caller gave no rid (the server makes them)."""
    if rid is None:
        return None
    if isinstance(rid, list):
        if len(rid) != batch or not all(isinstance(r, str) and r for r in rid):
            raise BadRequest(f"The specified rids length mismatch with the batch_size for batch processing: want a "
                             f"list of {batch} non-empty strings")
        bases = rid
    elif isinstance(rid, str) and rid:
        bases = [rid] if batch == 1 else [f"{rid}_{i}" for i in range(batch)]
    else:
        raise BadRequest("The rid should be a string or a list of strings.")
    return [b if n == 1 else f"{b}_{k}" for b in bases for k in range(n)]


def parse_generate(body, tokenizer, vocab_size: int, context_len: int, strict: bool,
                   routed_experts: bool = True) -> dict:
    """A validated /generate request: prompts, params, n, rids (None: server-made), flags.
    ``routed_experts``: the version has ``GenerateReqInput.return_routed_experts`` (not 0.5.5)."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object (SGLang's GenerateReqInput)")
    _check_fields(body, GENERATE_FIELDS, "request")
    if strict and not routed_experts and "return_routed_experts" in body:
        raise BadRequest("return_routed_experts is not a field of this SGLang version's GenerateReqInput")
    prompts, batched = _prompt_ids(body, tokenizer, vocab_size)
    params, n = parse_sampling(body.get("sampling_params"), vocab_size, strict)
    for p in prompts:  # tokenizer_manager _validate_one_request: prompt and budget within the context (strict:
        if strict and len(p) + params.max_new_tokens >= context_len:  # our engine itself has no such limit)
            raise BadRequest(f"Requested token count exceeds the model's maximum context length of {context_len} "
                             f"tokens. You requested a total of {len(p) + params.max_new_tokens} tokens: {len(p)} "
                             f"tokens from the input messages and {params.max_new_tokens} tokens for the completion.")
    logprob = body.get("return_logprob")
    if logprob is not None and not isinstance(logprob, bool):
        raise BadRequest("return_logprob must be a boolean (per-prompt lists are not implemented by the stand-in)")
    return {"prompts": prompts, "batched": batched, "params": params, "n": n, "logprob": bool(logprob),
            "rids": _rids(body.get("rid"), len(prompts), n),
            "routed": bool(body.get("return_routed_experts"))}


def finish_reason(req, text: str) -> dict:
    """python/sglang/srt/managers/schedule_batch.py, FINISH_LENGTH / FINISH_MATCHED_TOKEN /
    FINISH_MATCHED_STR / FINISH_ABORT ``to_json``."""
    if req.finish_reason == "length":
        return {"type": "length", "length": len(req.output_ids)}
    if req.finish_reason == "abort":
        return {"type": "abort", "message": "Abort in waiting queue" if not req.output_ids else "Aborted"}
    matched = next((s for s in req.params.stop if s in text), None)
    return {"type": "stop", "matched": matched if matched is not None else (req.output_ids or [None])[-1]}
