"""SGLang's HTTP contract, read mechanically from an SGLang wheel (never installed, never imported).

:func:`load` opens ``sglang-<version>-*.whl`` (a zip) from the wheel cache that
``scripts/fetch_sglang_wheels.sh`` fills and reads, with :mod:`ast` only:

- the request classes of ``sglang/srt/managers/io_struct.py`` (dataclasses or msgspec Structs, base
  class fields included) and ``SamplingParams`` (``sglang/srt/sampling/sampling_params.py``);
- the routes of ``sglang/srt/entrypoints/http_server.py`` (``@app.post("/x")``, ``@app.api_route``),
  the request class each one parses and the shapes of what it answers (``Response()`` with no body,
  ``ORJSONResponse({...})`` keys, a function that falls off its end answers ``null``);
- the launch flags: ``parser.add_argument("--flag", ...)`` in ``server_args.py`` and, in newer
  releases, the ``A[T, "help"]`` / ``A[T, Arg(...)]`` fields of ``sglang/srt/arg_groups/fields/*.py``
  (``--field-name``, ``Arg(cli_name=..., aliases=[...])``, skipped when ``no_cli=True``), plus the
  ``ServerArgs`` field defaults (e.g. ``weight_version``).

The parse of each wheel is cached as JSON beside it (``<wheel>.contract.json``). :func:`strict_defaults`
gives the defaults our strict stand-in server should take from a version.
"""
from __future__ import annotations

import ast
import json
import os
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from miles_ray.rollout.sglang.contract_parse import (
    ARG_FIELDS, HTTP_SERVER, IO_STRUCT, SERVER_ARGS, Field, Flag, Reply, RequestClass, Route, node_name, read_classes,
    read_flags, read_routes, read_server_fields)

PARSER_VERSION = 4  # bump when the parse changes: cached JSON of another version is re-read
SAMPLING = "sglang/srt/sampling/sampling_params.py"
TOKENIZER_MANAGER = "sglang/srt/managers/tokenizer_manager.py"
WEIGHT_VERSIONS = "sglang/srt/utils/weight_versions.py"  # meta_info["weight_versions"] spans (newer releases)
FETCH_SCRIPT = "scripts/fetch_sglang_wheels.sh"


@dataclass(frozen=True)
class Contract:
    version: str
    requests: dict[str, RequestClass]
    routes: tuple[Route, ...]
    flags: dict[str, Flag]  # every spelling (aliases included) -> its flag
    server_fields: dict[str, Field]  # ServerArgs fields and their defaults
    notes: dict[str, list] = field(default_factory=dict)  # behaviour found in code: name -> [file, line]

    def request(self, name: str) -> RequestClass:
        if name not in self.requests:
            raise KeyError(f"SGLang {self.version} has no request class {name}")
        return self.requests[name]

    def route(self, path: str, method: str = "POST") -> Route | None:
        return next((r for r in self.routes if r.path == path and method in r.methods), None)

    def default(self, cls: str, name: str):
        return self.request(cls).fields[name].default

    def server_default(self, name: str):
        return self.server_fields[name].default

    def unknown_fields(self, cls: str, body: dict) -> list[str]:
        """Keys of ``body`` that request class ``cls`` does not have."""
        return sorted(set(body) - set(self.request(cls).fields))

    def missing_flags(self, argv: list) -> list[str]:
        """``--flags`` in ``argv`` this version does not accept."""
        names = [a.split("=")[0] for a in argv if isinstance(a, str) and a.startswith("--")]
        return [n for n in names if n not in self.flags]


# -- wheels ------------------------------------------------------------------------------------
def wheel_dir() -> Path:
    default = Path(__file__).resolve().parents[3] / ".cache" / "sglang-wheels"
    return Path(os.environ.get("SGLANG_WHEEL_CACHE", default))


def version_key(v: str) -> tuple:
    return tuple(int(x) if x.isdigit() else -1 for x in re.split(r"[.]|post", v) if x)


def wheels(folder: Path | None = None) -> dict[str, Path]:
    """version -> wheel path, for the wheels in the cache (oldest first)."""
    found = {}
    for p in Path(folder or wheel_dir()).glob("sglang-*.whl"):
        found[p.name.split("-")[1]] = p
    return dict(sorted(found.items(), key=lambda kv: version_key(kv[0])))


def load(version: str, folder: Path | None = None) -> Contract:
    """The contract of SGLang ``version`` (FileNotFoundError when its wheel was not fetched)."""
    path = wheels(folder).get(version)
    if path is None:
        raise FileNotFoundError(f"no SGLang {version} wheel in {folder or wheel_dir()}: run {FETCH_SCRIPT}")
    return read_wheel(path)


def read_wheel(path: Path) -> Contract:
    cache = path.with_name(path.name + ".contract.json")
    if cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("parser_version") == PARSER_VERSION:
            return from_json(data)
    contract = parse_wheel(path)
    try:
        cache.write_text(json.dumps({"parser_version": PARSER_VERSION, **asdict(contract)}))
    except OSError:
        pass
    return contract


def parse_wheel(path: Path) -> Contract:
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        src = {n: z.read(n).decode() for n in names
               if n in (IO_STRUCT, HTTP_SERVER, SERVER_ARGS, SAMPLING, TOKENIZER_MANAGER, WEIGHT_VERSIONS)
               or (n.startswith(ARG_FIELDS) and n.endswith(".py"))}
    requests = read_classes(src[IO_STRUCT], IO_STRUCT)
    if SAMPLING in src:
        requests.update({k: v for k, v in read_classes(src[SAMPLING], SAMPLING).items() if k == "SamplingParams"})
    server_fields = read_server_fields(src)
    notes = {}
    if TOKENIZER_MANAGER in src and (line := pause_abort_line(src[TOKENIZER_MANAGER])):
        notes["pause_aborts_all"] = [TOKENIZER_MANAGER, line]
    if WEIGHT_VERSIONS in src and (line := function_line(src[WEIGHT_VERSIONS], "add_weight_versions_to_meta_info")):
        notes["weight_version_spans"] = [WEIGHT_VERSIONS, line]
    return Contract(version=path.name.split("-")[1], requests=requests,
                    routes=tuple(read_routes(src[HTTP_SERVER], HTTP_SERVER)),
                    flags=read_flags(src, server_fields), server_fields=server_fields, notes=notes)


def _flag(d: dict) -> Flag:
    return Flag(**{**d, "choices": tuple(d["choices"]) if d.get("choices") is not None else None})


def from_json(data: dict) -> Contract:
    def fields(d):
        return {k: Field(**f) for k, f in d.items()}

    requests = {k: RequestClass(r["name"], r["file"], r["line"], fields(r["fields"]))
                for k, r in data["requests"].items()}
    routes = tuple(Route(**{**r, "methods": tuple(r["methods"]),
                            "replies": tuple(Reply(**{**x, "keys": tuple(x["keys"])}) for x in r["replies"])})
                   for r in data["routes"])
    return Contract(data["version"], requests, routes, {k: _flag(f) for k, f in data["flags"].items()},
                    fields(data["server_fields"]), data.get("notes", {}))


# -- behaviour the strict server takes ------------------------------------------------------------
def pause_abort_line(source: str) -> int | None:
    """Line where ``TokenizerManager.pause_generation`` aborts every request unconditionally
    (SGLang 0.5.5: ``/pause_generation`` has no body and always aborts), or None."""
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, ast.AsyncFunctionDef) and fn.name == "pause_generation" and not fn.args.args[1:]:
            for node in ast.walk(fn):
                if isinstance(node, ast.Call) and node_name(node.func) == "abort_request" and any(
                        k.arg == "abort_all" and isinstance(k.value, ast.Constant) and k.value.value for k in node.keywords):
                    return node.lineno
    return None


def function_line(source: str, name: str) -> int | None:
    """Line of the top-level function ``name`` in ``source``, or None."""
    return next((f.lineno for f in ast.parse(source).body if isinstance(f, ast.FunctionDef) and f.name == name), None)


def strict_defaults(contract: Contract) -> dict:
    """What a server speaking ``contract.version`` does when a client leaves a choice open."""
    pause = contract.requests.get("PauseGenerationReqInput")
    abort_route = contract.route("/abort_request")
    return {
        "weight_version": contract.server_default("weight_version"),
        "update_weight_version_abort_all_requests": contract.default("UpdateWeightVersionReqInput",
                                                                     "abort_all_requests"),
        "pause_mode": pause.fields["mode"].default if pause and "mode" in pause.fields
        else ("abort" if "pause_aborts_all" in contract.notes else None),
        "abort_request_reply": abort_route.replies[0].kind if abort_route and abort_route.replies else None,
        "pause_reply_keys": list(next((r.keys for r in contract.route("/pause_generation").replies
                                       if r.kind == "json"), ())),
    }
