"""The plan as text: one table per role (items of one GPU of that role), one per placement (GPU
totals by phase), the fixed assumptions and the verdict."""
from __future__ import annotations

from miles_ray.plan.layout import PHASES, Plan
from miles_ray.plan.types import ASSUMPTIONS, GIB

WHEN = {"both": "always", "train": "training", "rollout": "rollout"}


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _is_number(v) -> bool:
    return str(v).replace(".", "", 1).isdigit() or v in ("", "yes", "NO")


def _table(header: list, rows: list) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    numeric = [all(_is_number(r[i]) for r in rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).rjust(w) if numeric[i] else str(v).ljust(w)  # noqa: E731
                               for i, (v, w) in enumerate(zip(r, widths))).rstrip()
    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def role_table(role: str, items: list) -> list[str]:
    rows = [[i.name, _gib(i.bytes), WHEN[i.phase], i.knob] for i in items]
    rows.append(["total", _gib(sum(i.bytes for i in items)), "", ""])
    return [f"{role} (one GPU)", *_table(["item", "GiB", "held", "knob"], rows)]


def placement_table(name: str, gpus: list, limit: int) -> list[str]:
    rows = []
    for g in gpus:
        phases = [_gib(g.total(p)) if g.colocated else "" for p in PHASES]
        rows.append([g.name, *phases, _gib(g.peak), "yes" if g.peak <= limit else "NO"])
    return [f"{name} placement", *_table(["GPU", "train phase", "rollout phase", "need GiB", "fits"], rows)]


def render_plan(plan: Plan, title: str = "") -> str:
    m = plan.model
    lines = [f"memory plan{': ' + title if title else ''}",
             f"model: {m.get('model_type')} with {plan.parameters:,} parameters ({plan.parameters / 1e9:.2f}B); "
             f"GPU: {plan.limit / GIB:g} GiB (cluster.gpu_memory_gib)", ""]
    for role, items in plan.roles.items():
        lines += [*role_table(role, items), ""]
    for name, gpus in plan.placements.items():
        mark = " (configured)" if name == plan.placement else ""
        lines += [*placement_table(name + mark, gpus, plan.limit), ""]
    lines += ["assumptions:", *(f"  - {a}" for a in ASSUMPTIONS), ""]
    lines.append(f"verdict: fits ({plan.placement})" if plan.fits else f"verdict: does NOT fit: {plan.problem()}")
    return "\n".join(lines) + "\n"
