"""The :mod:`ast` readers behind :mod:`miles_ray.rollout.sglang.contract`: request classes, HTTP
routes (and what they answer) and launch flags, from the source text of SGLang files."""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass

IO_STRUCT = "sglang/srt/managers/io_struct.py"
HTTP_SERVER = "sglang/srt/entrypoints/http_server.py"
SERVER_ARGS = "sglang/srt/server_args.py"
ARG_FIELDS = "sglang/srt/arg_groups/fields/"
_VERBS = {"get", "post", "put", "delete", "patch"}
_JSON_REPLIES = {"ORJSONResponse", "JSONResponse", "SGLangORJSONResponse"}
_FACTORIES = {"list": "[]", "dict": "{}", "set": "set()", "tuple": "()"}


@dataclass(frozen=True)
class Field:
    name: str
    default_src: str | None  # the default as source text; None: the field is required
    line: int

    @property
    def required(self) -> bool:
        return self.default_src is None

    @property
    def default(self):
        """The default as a Python value (ValueError when it is not a literal)."""
        if self.default_src is None:
            raise ValueError(f"{self.name} has no default")
        return ast.literal_eval(self.default_src)


@dataclass(frozen=True)
class RequestClass:
    name: str
    file: str
    line: int
    fields: dict[str, Field]


@dataclass(frozen=True)
class Reply:
    """One ``return`` of a route: kind ``empty`` (Response() without content), ``json`` (keys when
    the code shows them), ``text``, ``null`` (no return: FastAPI answers ``null``) or ``other``."""
    kind: str
    line: int
    keys: tuple[str, ...] = ()
    status: str | None = None


@dataclass(frozen=True)
class Route:
    path: str
    methods: tuple[str, ...]
    function: str
    file: str
    line: int
    body: str | None  # the request class the route parses its body into
    replies: tuple[Reply, ...] = ()


@dataclass(frozen=True)
class Flag:
    name: str
    dest: str
    default_src: str | None
    file: str
    line: int
    choices: tuple | None = None  # when the code lists them as a literal


def _choices(node) -> tuple | None:
    try:
        return tuple(ast.literal_eval(node)) if node is not None else None
    except (ValueError, TypeError, SyntaxError):
        return None


# -- classes and fields -------------------------------------------------------------------------
def node_name(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Call):
        return node_name(node.func)
    if isinstance(node, ast.Subscript):
        return node_name(node.value)
    return ""


def _default_src(value) -> str | None:
    """``x = 3`` / ``field(default=3)`` / ``field(default_factory=list)`` -> source of the default."""
    if value is None:
        return None
    if isinstance(value, ast.Call) and node_name(value.func) == "field":
        kw = {k.arg: k.value for k in value.keywords}
        if "default" in kw:
            return ast.unparse(kw["default"])
        if "default_factory" in kw:
            f = ast.unparse(kw["default_factory"])
            return _FACTORIES.get(f, f + "()")
        return None
    return ast.unparse(value)


def _class_fields(node: ast.ClassDef) -> dict[str, Field]:
    out = {}
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and node_name(stmt.annotation) != "ClassVar":
            out[stmt.target.id] = Field(stmt.target.id, _default_src(stmt.value), stmt.lineno)
        elif isinstance(stmt, ast.FunctionDef) and stmt.name == "__init__":
            out.update(_init_fields(stmt))
    return out


def _init_fields(fn: ast.FunctionDef) -> dict[str, Field]:
    a = fn.args
    pos = a.posonlyargs + a.args
    defaults = [None] * (len(pos) - len(a.defaults)) + list(a.defaults)
    pairs = list(zip(pos, defaults)) + list(zip(a.kwonlyargs, a.kw_defaults))
    return {arg.arg: Field(arg.arg, _default_src(d), arg.lineno) for arg, d in pairs if arg.arg != "self"}


def read_classes(source: str, file: str) -> dict[str, RequestClass]:
    """Every top-level class with its fields, those of its bases in the same module first."""
    nodes = {n.name: n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)}

    def fields_of(name: str, seen: frozenset = frozenset()) -> dict[str, Field]:
        node = nodes[name]
        out = {}
        for base in node.bases:
            b = node_name(base)
            if b in nodes and b not in seen:
                out.update(fields_of(b, seen | {name}))
        out.update(_class_fields(node))
        return out

    return {name: RequestClass(name, file, n.lineno, fields_of(name)) for name, n in nodes.items()}


# -- routes ---------------------------------------------------------------------------------------
def _path(arg) -> str | None:
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.Call) and arg.args and isinstance(arg.args[-1], ast.Constant):
        return arg.args[-1].value  # os.environ.get("ROUTE_ENV", "/default")
    return None


def _route_decorators(fn) -> list[tuple[str, tuple[str, ...], int]]:
    """(path, methods, line of the decorator) for each route decorator of ``fn``."""
    out = []
    for d in fn.decorator_list:
        if not (isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.args):
            continue
        verb, path = d.func.attr, _path(d.args[0])
        if path is None:
            continue
        if verb in _VERBS:
            out.append((path, (verb.upper(),), d.lineno))
        elif verb == "api_route":
            kw = {k.arg: k.value for k in d.keywords}
            methods = ast.literal_eval(kw["methods"]) if "methods" in kw else ["GET"]
            out.append((path, tuple(methods), d.lineno))
    return out


def _body_class(fn) -> str | None:
    for arg in fn.args.args:
        ann = arg.annotation
        if isinstance(ann, ast.Subscript) and node_name(ann.value) == "Annotated":
            ann = ann.slice.elts[0] if isinstance(ann.slice, ast.Tuple) else ann.slice
        name = node_name(ann) if ann is not None else ""
        if name and name not in ("Request", "Response", "float", "int", "str", "bool"):
            return name
    return None


def read_routes(source: str, file: str) -> list[Route]:
    routes = []
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            replies = tuple(_replies(fn)) if _route_decorators(fn) else ()
            routes += [Route(path, methods, fn.name, file, line, _body_class(fn), replies)
                       for path, methods, line in _route_decorators(fn)]
    return routes


def _own_returns(fn):
    """The ``return`` statements of ``fn`` itself (not of functions nested in it)."""
    stack = list(fn.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Return):
            yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))


def _falls_through(stmts: list) -> bool:
    if not stmts:
        return True
    last = stmts[-1]
    if isinstance(last, (ast.Return, ast.Raise)):
        return False
    if isinstance(last, ast.Try):
        return _falls_through(last.orelse or last.body)
    if isinstance(last, ast.If):
        return _falls_through(last.body) or _falls_through(last.orelse)
    return True


def _dict_keys(node, fn) -> tuple[str, ...]:
    if isinstance(node, ast.Name):  # content = {...}; return ORJSONResponse(content, ...)
        assigned = [s.value for s in ast.walk(fn) if isinstance(s, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == node.id for t in s.targets)]
        node = assigned[-1] if assigned else node
    if isinstance(node, ast.Dict):
        return tuple(k.value for k in node.keys if isinstance(k, ast.Constant))
    return ()


def _reply(ret: ast.Return, fn) -> Reply:
    v = ret.value
    if v is None or (isinstance(v, ast.Constant) and v.value is None):
        return Reply("null", ret.lineno)
    if isinstance(v, ast.Await):
        v = v.value
    if isinstance(v, ast.Dict):
        return Reply("json", ret.lineno, _dict_keys(v, fn))
    if isinstance(v, ast.Call):
        kw = {k.arg: k.value for k in v.keywords}
        status = ast.unparse(kw["status_code"]) if "status_code" in kw else None
        content = kw.get("content", v.args[0] if v.args else None)
        if node_name(v.func) == "Response":
            return Reply("empty" if content is None else "text", ret.lineno, status=status)
        if node_name(v.func) in _JSON_REPLIES:
            return Reply("json", ret.lineno, _dict_keys(content, fn) if content is not None else (), status)
    return Reply("other", ret.lineno, (ast.unparse(v)[:80],))


def _replies(fn) -> list[Reply]:
    out = sorted((_reply(r, fn) for r in _own_returns(fn)), key=lambda r: r.line)
    if _falls_through(fn.body):
        out.append(Reply("null", fn.end_lineno or fn.lineno))
    return out


# -- flags ----------------------------------------------------------------------------------------
def read_server_fields(src: dict) -> dict[str, Field]:
    """``ServerArgs`` fields: the dataclass in server_args.py (older releases) and the namespace
    classes of arg_groups/fields/ (newer releases)."""
    out = {}
    classes = read_classes(src[SERVER_ARGS], SERVER_ARGS)
    if "ServerArgs" in classes:
        out.update(classes["ServerArgs"].fields)
    for file in sorted(f for f in src if f.startswith(ARG_FIELDS)):
        for node in ast.parse(src[file]).body:
            if isinstance(node, ast.ClassDef) and _is_namespace(node):
                out.update({k: Field(f.name, f.default_src, f.line) for k, f in _class_fields(node).items()})
    return out


def _is_namespace(node: ast.ClassDef) -> bool:
    return any(isinstance(s, ast.Assign) and any(node_name(t) == "_NS_PATH" for t in s.targets) for s in node.body)


def read_flags(src: dict, server_fields: dict[str, Field]) -> dict[str, Flag]:
    flags = {}
    for file in [SERVER_ARGS, *sorted(f for f in src if f.startswith(ARG_FIELDS))]:
        found = _add_argument_flags(src[file], file, server_fields) + _annotated_flags(src[file], file)
        for names, flag in found:
            flags.update({n: flag for n in names})
    return flags


def _resolve_default(node, server_fields: dict[str, Field]) -> str | None:
    if node is None:
        return None
    text = ast.unparse(node)
    m = re.fullmatch(r"ServerArgs\.(\w+)|_declared_default\(['\"](\w+)['\"]\)", text)
    name = m and (m.group(1) or m.group(2))
    return server_fields[name].default_src if name in server_fields else text


def _add_argument_flags(source: str, file: str, server_fields: dict[str, Field]) -> list:
    out = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and node_name(node.func) == "add_argument"):
            continue
        names = [a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")]
        if not names:
            continue
        kw = {k.arg: k.value for k in node.keywords}
        dest = kw["dest"].value if isinstance(kw.get("dest"), ast.Constant) else names[0].lstrip("-").replace("-", "_")
        default = _resolve_default(kw.get("default"), server_fields)
        if default is None and isinstance(kw.get("action"), ast.Constant) and kw["action"].value == "store_true":
            default = "False"
        out.append((names, Flag(names[0], dest, default, file, node.lineno, _choices(kw.get("choices")))))
    return out


def _annotated_flags(source: str, file: str) -> list:
    """``name: A[T, "help"] = d`` / ``A[T, Arg(cli_name=..., aliases=[...])]`` fields of namespace classes."""
    out = []
    for cls in ast.parse(source).body:
        if not (isinstance(cls, ast.ClassDef) and _is_namespace(cls)):
            continue
        for stmt in cls.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(stmt.annotation, ast.Subscript) and node_name(stmt.annotation.value) in ("A", "Annotated")
                    and isinstance(stmt.annotation.slice, ast.Tuple)):
                continue
            meta = next((m for m in stmt.annotation.slice.elts[1:] if isinstance(m, ast.Constant)
                         or (isinstance(m, ast.Call) and node_name(m.func) == "Arg")), None)
            kw = {k.arg: k.value for k in meta.keywords} if isinstance(meta, ast.Call) else {}
            if meta is None or (isinstance(kw.get("no_cli"), ast.Constant) and kw["no_cli"].value):
                continue
            field_name = stmt.target.id
            name = kw["cli_name"].value if "cli_name" in kw else "--" + field_name.replace("_", "-")
            aliases = ast.literal_eval(kw["aliases"]) if "aliases" in kw else []
            out.append(([name, *aliases], Flag(name, field_name, _default_src(stmt.value), file, stmt.lineno,
                                               _choices(kw.get("choices")))))
    return out
