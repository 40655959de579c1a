"""Explicit engine health states (NeMo-RL style): an engine serves only when READY.

READY    -> weights of ``weight_version`` loaded, serving
RELEASED -> memory freed for colocated training; cannot serve
STALE    -> memory back (or a fresh restart) but weights not refit yet; cannot serve
A STALE/RELEASED engine becomes READY only through a complete weight load.
"""
from __future__ import annotations

READY, RELEASED, STALE = "ready", "released", "stale"


class EngineNotReady(RuntimeError):
    pass
