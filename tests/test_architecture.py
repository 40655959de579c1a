"""Structure checks, from source only: no import cycles, the layering of the four folders, no
reaching into another object's underscore attributes, files of a readable size."""
import ast
from pathlib import Path

from helpers.imports import PACKAGES, cycles, import_graph, module_name, project_modules, third_party_imports

ROOT = Path(__file__).resolve().parents[1]
# the package root's run() is the public API: it imports jobs.train when called (documented there)
LAYER_EXCEPTIONS = {("miles_ray", "jobs")}
FORBIDDEN = {  # folder -> top-level names it must not import
    "miles_ray": {"ray", "actors", "placement", "jobs"},
    "placement": {"actors", "jobs"},
    "actors": {"jobs", "placement"},
}


def test_no_import_cycles():
    found = cycles(import_graph(ROOT))
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_cycle_detection_finds_a_planted_cycle(tmp_path):
    """The checker itself: a lazy import inside a function closes a cycle and is found."""
    pkg = tmp_path / "jobs"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from jobs.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from jobs import c\n")
    (pkg / "c.py").write_text("import jobs.a\n")
    (pkg / "d.py").write_text("from . import a\n")  # relative, outside the cycle
    graph = import_graph(tmp_path, ("jobs",))
    assert graph["jobs.d"] == {"jobs.a"}
    assert cycles(graph) == [["jobs.a", "jobs.b", "jobs.c"]]


def test_layers():
    bad = []
    for module, path in project_modules(ROOT).items():
        folder = module.split(".")[0]
        for name in third_party_imports(path) & FORBIDDEN.get(folder, set()):
            if (module, name) not in LAYER_EXCEPTIONS:
                bad.append(f"{module} imports {name}")
    assert bad == []


def _external_names(tree: ast.AST) -> set[str]:
    """Names a module binds to third-party modules (``import torch``, ``from torch import nn``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] not in PACKAGES)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level \
                and node.module.split(".")[0] not in PACKAGES:
            names.update(a.asname or a.name for a in node.names)
    return names


def test_no_foreign_underscore_attributes():
    """``obj._x`` only on ``self``/``cls`` (or a third-party module, e.g. ``torch._scaled_mm``):
    no module touches another project object's private state."""
    bad = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            tree = ast.parse(path.read_text())
            allowed = {"self", "cls"} | _external_names(tree)
            for node in ast.walk(tree):
                if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                        and not (isinstance(node.value, ast.Name) and node.value.id in allowed)):
                    bad.append(f"{module_name(ROOT, path)}:{node.lineno} {ast.unparse(node)}")
    assert bad == []


def test_files_stay_readable():
    sizes = {module_name(ROOT, p): len(p.read_text().splitlines())
             for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    assert {m: n for m, n in sizes.items() if n > 400} == {}
