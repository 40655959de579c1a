"""Names -> weight transports and HTTP payload formats.

``WEIGHT_TRANSPORTS`` maps ``weight_sync.transport`` to a :class:`~miles_ray.weights.transport.WeightTransport`
subclass; a ``pkg.module:Class`` import path works too (resolved by :class:`~miles_ray.utils.registry.Registry`).
``WEIGHT_FORMATS`` maps payload-format names to :class:`~miles_ray.weights.transport.PayloadFormat`
subclasses (an HTTP engine's format follows from the config: :func:`miles_ray.rollout.http.engine.weight_format`).

The built-in modules register themselves when :mod:`miles_ray.weights` is imported (which Python does
before this module).
"""
from __future__ import annotations

from miles_ray.utils.registry import Registry
from miles_ray.utils.resolve import Contract, PluginError
from miles_ray.weights.transport import PayloadFormat, WeightTransport

WEIGHT_TRANSPORTS = Registry("weight transport", "weight_sync.transport", Contract(
    call="Transport() (then export(bucket) on trainer rank 0, load(payload) on the engines)",
    returns="a miles_ray.weights.WeightTransport", attrs=("export", "load")))
WEIGHT_FORMATS = Registry("weight payload format")


def weight_transport(spec: str) -> type[WeightTransport]:
    """The transport class registered as ``spec`` (or imported from ``pkg.module:Class``); a
    :class:`~miles_ray.utils.resolve.PluginError` naming ``weight_sync.transport`` otherwise."""
    cls = WEIGHT_TRANSPORTS.get_fn(spec)
    if not (isinstance(cls, type) and issubclass(cls, WeightTransport)):
        raise PluginError(f"weight_sync.transport='{spec}': is {cls!r}, not a class derived from "
                          "miles_ray.weights.WeightTransport; fix: subclass it (docs/architecture.md, 'Weight "
                          "transports')")
    return cls


def payload_format(name: str) -> type[PayloadFormat]:
    return WEIGHT_FORMATS.get_fn(name)


def format_for(load_format, sglang_api: bool) -> type[PayloadFormat] | None:
    """The format a server in that mode decodes for a body's ``load_format`` (None: not accepted)."""
    for cls in WEIGHT_FORMATS.values():
        if cls.sglang_api == sglang_api and cls.load_format == load_format:
            return cls
    return None


def accepted_load_formats(sglang_api: bool) -> list:
    return [cls.load_format for cls in WEIGHT_FORMATS.values() if cls.sglang_api == sglang_api]
