"""Print docs/sglang.md's tables: per SGLang version (wheels in .cache/sglang-wheels, fetched by
scripts/fetch_sglang_wheels.sh), each endpoint and flag we use, where SGLang defines it (file:line as
read from the wheel by miles_ray.rollout.sglang.contract), the test that covers it and the known
mismatches of issue 25.  Usage: .venv/bin/python scripts/sglang_contract_table.py > /tmp/tables.md
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from miles_ray.rollout.sglang import contract as sc  # noqa: E402

T = "tests/unit/rollout/sglang/test_contract.py"
ROUTES_TEST = "test_client_calls_only_routes_and_fields_sglang_has"
ITEMS = {  # issue 25, all fixed (docs/sglang.md "Known mismatches")
    1: "empty 200 body: the client reads the status only",
    2: "abort_all_requests defaults to True: the client sends false",
    3: "first version \"default\" (any string): version 0, the launch weights",
    4: "not a flag of SGLang: not passed; 0.5.23 updates carry selector=\"target\"",
    5: "mode sent where it exists (retract for partial rollout, else abort); 0.5.5: no body, aborted prefixes re-submitted",
    6: "--enable-return-routed-experts + return_routed_experts with R3; base64 int32 [seqlen-1, layers, topk] decoded",
    7: "route gone in newer releases: /get_model_info used there",
    8: "updates only inside /begin_weight_update ... /end_weight_update (0.5.23)",
}
SYS = "tests/system/rollout/sglang/test_sglang_versions.py"
# (method, path, action in the test, tests, issue items)
ROUTES = [
    ("POST", "/generate", "generate", "test_sampling_params_are_sglangs, test_client_reads_the_first_weight_version, "
     "test_client_decodes_routed_experts", (3, 6)),
    ("GET", "/health", "health", "", ()),
    ("GET", "/get_weight_version", "weight_version", "(0.5.5 only)", (3, 7)),
    ("GET", "/get_model_info", "weight_version", "(newer)", (7,)),
    ("GET", "/get_server_info", "server_info", "", ()),
    ("POST", "/abort_request", "abort", "test_abort_survives_sglangs_empty_reply", (1,)),
    ("POST", "/flush_cache", "flush_cache", f"test_update_protocol_per_version, {SYS}", ()),
    ("POST", "/pause_generation", "pause", "test_client_pauses_in_the_mode_partial_rollout_needs, "
     "test_pause_without_a_mode_aborts_everything", (5,)),
    ("POST", "/continue_generation", "resume", "test_update_protocol_per_version", ()),
    ("POST", "/begin_weight_update", "update_protocol", "test_update_protocol_per_version", (8,)),
    ("POST", "/end_weight_update", "update_protocol", "test_update_protocol_per_version", (8,)),
    ("POST", "/release_memory_occupation", "release_memory", "", ()),
    ("POST", "/resume_memory_occupation", "resume_memory", "", ()),
    ("POST", "/update_weight_version", "update_weight_version", "test_update_weight_version_keeps_running_requests",
     (2,)),
    ("POST", "/update_weights_from_tensor", "update_weights_from_tensor, update_weights_flattened", "", (4,)),
    ("POST", "/init_weights_update_group", "init_weights_update_group",
     "tests/system/rollout/sglang/test_sglang_group.py", ()),
    ("POST", "/update_weights_from_distributed", "update_weights_from_distributed, receive_broadcast", "", (4,)),
    ("POST", "/update_weights_from_disk", "update_weights_from_disk", "", ()),
]
LAUNCH = "test_launcher_flags_exist"
SPEC = "test_speculative_flags_exist"
FLAGS = [(f, LAUNCH, ()) for f in ("--model-path", "--enable-memory-saver", "--skip-server-warmup", "--host", "--port",
                                   "--dtype", "--tp-size", "--mem-fraction-static", "--api-key")]
FLAGS += [(f, SPEC, ()) for f in ("--speculative-algorithm", "--speculative-draft-model-path",
                                  "--speculative-num-steps", "--speculative-eagle-topk",
                                  "--speculative-num-draft-tokens")]
FLAGS += [("--enable-return-routed-experts", "test_client_decodes_routed_experts, " + SYS, (6,)),
          ("--weight-version", "(not passed by us)", (3,))]


def where(file: str, line: int) -> str:
    return f"`{file.removeprefix('sglang/srt/')}:{line}`"


def marks(items) -> str:
    return "; ".join(f"**item {i}**: {ITEMS[i]}" for i in items)


def route_rows(c: sc.Contract) -> list[str]:
    rows = ["| we call | SGLang route (methods) | body class | replies | covered by | issue 25 item (fixed) |",
            "|---|---|---|---|---|---|"]
    for method, path, action, tests, items in ROUTES:
        r = c.route(path, method)
        covers = ", ".join([f"routes[{c.version}-{a}]" for a in action.split(", ")] + ([tests] if tests else []))
        if r is None:
            rows.append(f"| {method} {path} | absent (not called here) | | | {covers} | {marks(items)} |")
            continue
        body = c.requests.get(r.body) if r.body else None
        body_at = f"{r.body} {where(body.file, body.line)}" if body else "(none: body ignored)"
        replies = ", ".join(sorted({x.kind + (f" {{{', '.join(x.keys)}}}" if x.kind == "json" and x.keys else "")
                                    for x in r.replies}))
        rows.append(f"| {method} {path} | {where(r.file, r.line)} ({', '.join(r.methods)}) | {body_at} | {replies} "
                    f"| {covers} | {marks(items)} |")
    return rows


def flag_rows(c: sc.Contract) -> list[str]:
    rows = ["| flag | SGLang definition | default | covered by | issue 25 item (fixed) |", "|---|---|---|---|---|"]
    for name, test, items in FLAGS:
        f = c.flags.get(name)
        at = f"{where(f.file, f.line)} (`{f.name}`)" if f else "**MISSING**"
        rows.append(f"| `{name}` | {at} | {f'`{f.default_src}`' if f else ''} | {test} | {marks(items)} |")
    return rows


def default_rows(c: sc.Contract) -> list[str]:
    rows = ["| default the strict server takes (`contract.strict_defaults`) | value |", "|---|---|"]
    rows += [f"| {k} | `{v!r}` |" for k, v in sc.strict_defaults(c).items()]
    return rows + [f"| behaviour: {k} | {where(*v)} |" for k, v in c.notes.items()]


def main() -> None:
    print(f"`routes[V-action]` = {T}::{ROUTES_TEST}[V-action]; every other test named is in {T} too.\n")
    found = sc.wheels()
    if not found:
        sys.exit(f"no SGLang wheels in {sc.wheel_dir()}: run {sc.FETCH_SCRIPT}")
    for version, path in found.items():
        c = sc.load(version)
        print(f"### SGLang {version} (`{path.name}`)\n")
        print("\n".join(route_rows(c)) + "\n")
        print("\n".join(flag_rows(c)) + "\n")
        print("\n".join(default_rows(c)) + "\n")


if __name__ == "__main__":
    main()
