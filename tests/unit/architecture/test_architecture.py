"""Structure checks, from source only: no import cycles, the layering of the four folders, the
floors inside ``miles_ray`` (no import from a lower floor to a higher one, lazy imports included),
no reaching into another object's underscore attributes, files of a readable size, test tiers."""
import ast
from pathlib import Path

from helpers.imports import PACKAGES, cycles, import_graph, module_name, project_modules, third_party_imports
from helpers.paths import ROOT

# the package root's run() is the public API: it imports jobs.train when called (documented there)
LAYER_EXCEPTIONS = {("miles_ray", "jobs")}
FORBIDDEN = {  # folder -> top-level names it must not import
    "miles_ray": {"ray", "actors", "placement", "jobs"},
    "placement": {"actors", "jobs"},
    "actors": {"jobs", "placement"},
}


# Floors inside miles_ray, low to high (docs/architecture.md). A module's floor is that of the longest
# prefix listed; it may import modules of its own floor or lower ones only.
FLOORS = (
    ("miles_ray.errors", "miles_ray.utils", "miles_ray.sample", "miles_ray.versioning", "miles_ray.config_sections",
     "miles_ray.config_doc", "miles_ray.buffer"),
    ("miles_ray.algorithms", "miles_ray.async_rl", "miles_ray.data", "miles_ray.quant", "miles_ray.models",
     "miles_ray.ledger", "miles_ray.eval"),
    ("miles_ray.weights",),
    ("miles_ray.config",),
    ("miles_ray.training", "miles_ray.rollout", "miles_ray.rewards", "miles_ray.rollout.http.guard", "miles_ray.plan"),
    ("miles_ray.training.fsdp", "miles_ray.training.megatron", "miles_ray.rollout.native", "miles_ray.rollout.sglang",
     "miles_ray.rollout.in_process", "miles_ray.rollout.hf_engine"),
    ("miles_ray.rollout.http",),
    ("miles_ray.training.backends", "miles_ray.rollout.backends"),
    ("miles_ray.openai_api",),
    ("miles_ray.agents",),
    ("miles_ray.ops",),
    ("miles_ray",),
)


def floor_of(module: str) -> int | None:
    best = None
    for i, names in enumerate(FLOORS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (i, name)
    return best[0] if best else None


def upward_imports(graph: dict) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        if not module.startswith("miles_ray"):
            continue
        for target in sorted(t for t in targets if t.startswith("miles_ray")):
            if floor_of(target) > floor_of(module):
                bad.append(f"{module} (floor {floor_of(module)}) imports {target} (floor {floor_of(target)})")
    return bad


def test_every_library_module_has_a_floor():
    assert [m for m in project_modules(ROOT, ("miles_ray",)) if floor_of(m) is None] == []


def test_no_import_runs_up_the_floors():
    assert upward_imports(import_graph(ROOT)) == []


def test_floor_check_finds_a_planted_lazy_upward_import(tmp_path):
    """The checker itself: a lazy import from the model floor up to the rollout engine is found."""
    for rel, text in {"miles_ray/__init__.py": "", "miles_ray/models/__init__.py": "",
                      "miles_ray/models/exact.py": "def f():\n    from miles_ray.rollout.native.model import SlotCache\n",
                      "miles_ray/rollout/__init__.py": "", "miles_ray/rollout/native/__init__.py": "",
                      "miles_ray/rollout/native/model.py": "SlotCache = 1\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    bad = upward_imports(import_graph(tmp_path, ("miles_ray",)))
    assert bad == ["miles_ray.models.exact (floor 1) imports miles_ray.rollout.native.model (floor 5)"]


def test_unit_tier_starts_no_ray_and_no_server():
    """tests/unit is one process: no Ray cluster (no shared-Ray fixture, no ray marker, no
    ray.init), no engine server, no spawned rank group; those belong in tests/system."""
    bad = []
    for path in sorted((ROOT / "tests" / "unit").rglob("test_*.py")):
        if path.name == "test_architecture.py":
            continue
        text = path.read_text()
        for needle in ("local_ray", "mark.ray", "ray.init(", "launch_server(", "cluster_utils", "mp.spawn("):
            if needle in text:
                bad.append(f"{path.relative_to(ROOT)}: {needle}")
    assert bad == []


def test_tests_mirror_the_tiers():
    """Every test file sits in tests/unit/ or tests/system/."""
    loose = [p.name for p in (ROOT / "tests").glob("test_*.py")]
    assert loose == []


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
