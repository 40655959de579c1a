"""Render a resolved :class:`Config` as commented YAML: every key with its value (defaults
included), its type and its description (``miles-ray config show``)."""
from __future__ import annotations

import typing

import yaml
from pydantic import BaseModel


def _type_name(annotation) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(str(a) for a in args)
    names = [_type_name(a) for a in args if a is not type(None)]
    return ("optional " if type(None) in args else "") + " | ".join(names) if names else str(annotation)


def _scalar(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def render(model: BaseModel, indent: int = 0) -> list[str]:
    """Lines of commented YAML for ``model`` (sections nested, ``# type: description`` per key)."""
    lines, pad = [], "  " * indent
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            doc = (type(value).__doc__ or "").strip().splitlines()
            lines.append(f"{pad}{name}:" + (f"  # {doc[0]}" if doc and not doc[0].startswith("!") else ""))
            lines.extend(render(value, indent + 1))
            continue
        note = _type_name(field.annotation) + (f": {field.description}" if field.description else "")
        lines.append(f"{pad}{name}: {_scalar(value)}  # {note}")
    return lines


def render_config(cfg: BaseModel) -> str:
    return "\n".join(render(cfg)) + "\n"
