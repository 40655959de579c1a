"""The per-version protocol table against SGLang's wheels: what :data:`protocol.KNOWN` holds for a
supported version is what :func:`protocol.from_contract` reads from its wheel, and the config's
and the strict server's fallbacks agree with the wheels."""
from __future__ import annotations

import pytest

from miles_ray.config import load_config
from miles_ray.utils.sglang_version import SGLANG_ROUTED_EXPERTS_SINCE, SGLANG_SUPPORTED, resolve_sglang_version
from miles_ray.errors import UserError
from miles_ray.rollout.http.server_sglang import FALLBACK_DEFAULTS, spans
from miles_ray.rollout.sglang import contract as sc
from miles_ray.rollout.sglang import protocol as sp


@pytest.fixture(params=SGLANG_SUPPORTED)
def contract(request) -> sc.Contract:
    try:
        return sc.load(request.param)
    except FileNotFoundError:
        pytest.skip(f"SGLang {request.param} wheel not cached: run {sc.FETCH_SCRIPT}")


def test_known_protocols_are_read_from_the_wheels(contract):
    assert sp.KNOWN[contract.version] == sp.from_contract(contract)
    assert sc.strict_defaults(contract) == FALLBACK_DEFAULTS


def test_routed_experts_threshold_matches_the_wheels():
    first = next(v for v in SGLANG_SUPPORTED if sp.KNOWN[v].routed_experts)
    assert first == SGLANG_ROUTED_EXPERTS_SINCE


def test_pause_modes():
    assert sp.KNOWN["0.5.5"].pause_mode(True) is None and sp.KNOWN["0.5.5"].pause_aborts
    assert sp.KNOWN["0.5.23"].pause_mode(True) == "retract" and sp.KNOWN["0.5.23"].pause_mode(False) == "abort"


def test_unknown_version_takes_the_nearest_older_protocol():
    assert sp.protocol_for("0.5.7").pause_modes == () and sp.protocol_for("0.5.7").version == "0.5.7"
    assert sp.protocol_for("0.6.0").update_session


def test_auto_version_without_sglang_installed_is_the_newest():
    assert resolve_sglang_version("auto") == SGLANG_SUPPORTED[-1]  # sglang is never installed here
    assert resolve_sglang_version("0.5.5") == "0.5.5"


def test_r3_refused_on_a_version_without_routed_experts():
    base = ["rollout.backend=native", "rollout.serve_http=true", "rollout.strict_sglang=true",
            "model.path=tiny:qwen3_moe", "algorithm.routing_replay=r3"]
    with pytest.raises((UserError, ValueError), match="rollout.sglang_version"):
        load_config(None, [*base, "rollout.sglang_version=0.5.5"])
    assert load_config(None, [*base, "rollout.sglang_version=0.5.23"]).rollout.sglang_version == "0.5.23"


def test_spans_of_per_token_versions():
    assert spans([1, 1, 2, 2, 2], str) == [{"version": "1", "start": 0, "end": 2}, {"version": "2", "start": 2, "end": 5}]
    assert spans([], str) == []
