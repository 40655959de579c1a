"""SGLang versions at the config's floor (the protocol per version is
:mod:`miles_ray.rollout.sglang.protocol`; tests/unit/rollout/sglang/test_protocol.py checks these
constants against SGLang's wheels)."""
from __future__ import annotations

SGLANG_SUPPORTED = ("0.5.5", "0.5.23")  # oldest first (miles_ray.rollout.sglang.protocol.KNOWN)
SGLANG_ROUTED_EXPERTS_SINCE = "0.5.23"  # GenerateReqInput.return_routed_experts (absent in 0.5.5's io_struct.py)


def sglang_version_key(v: str) -> tuple:
    return tuple(int(x) if x.isdigit() else -1 for x in v.replace("post", ".").split(".") if x)


def resolve_sglang_version(configured: str | None) -> str:
    """A version, or ``auto``/None: the installed sglang's package metadata, else the newest supported."""
    if configured and configured != "auto":
        return configured
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sglang")
    except PackageNotFoundError:
        return SGLANG_SUPPORTED[-1]


def returns_routed_experts(version: str) -> bool:
    """SGLang ``version`` has ``--enable-return-routed-experts`` / ``return_routed_experts``."""
    return sglang_version_key(version) >= sglang_version_key(SGLANG_ROUTED_EXPERTS_SINCE)
