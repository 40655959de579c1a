"""What our client does per SGLang version: the weight-update protocol and the features it uses.

A :class:`Protocol` is derived mechanically from a version's contract (:func:`from_contract`,
:mod:`miles_ray.rollout.sglang.contract`); :data:`KNOWN` holds the result for the versions we
support so that a GPU machine without the wheel cache needs no parse (a unit test checks
``KNOWN[v] == from_contract(load(v))`` for every cached wheel). Which version: the config's
``rollout.sglang_version``; ``auto`` = the installed ``sglang`` package's metadata (read with
:mod:`importlib.metadata`, sglang is never imported), else the newest supported.

The update protocol (slime / Miles; driven by :class:`miles_ray.rollout.http.engine.HttpEngine`):

1. pause: ``/pause_generation`` with ``mode`` where the version has one (0.5.23
   io_struct.py:1946 ``PauseGenerationReqInput.mode``): ``retract`` for partial rollout (in-flight
   requests stay, and the cache can be flushed: ``in_place`` would make ``flush_cache`` fail while
   requests run, io_struct.py:1936), ``abort`` otherwise. 0.5.5 takes no body and aborts every
   request (tokenizer_manager.py:1160): partial rollout then RE-SUBMITS each aborted request's
   prefix after the update (:meth:`miles_ray.rollout.sglang.client.EngineClient.generate_samples`).
2. ``/begin_weight_update`` (0.5.23 http_server.py:1458; updates outside a session fail,
   scheduler_components/weight_updater.py:196), with ``selector`` ``target`` when a separate draft
   must stay frozen (io_struct.py:2017/2045/2200).
3. the update (any payload format), ``flush_cache=false`` in the update itself;
4. ``/end_weight_update`` (0.5.23 http_server.py:1473);
5. ``/flush_cache`` (counted), 6. ``/update_weight_version`` with ``abort_all_requests=false``
   (it defaults to true: io_struct.py UpdateWeightVersionReqInput), 7. ``/continue_generation``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from miles_ray.utils.sglang_version import SGLANG_SUPPORTED as SUPPORTED, resolve_sglang_version as resolve_version
from miles_ray.utils.sglang_version import sglang_version_key as _key

__all__ = ["KNOWN", "SUPPORTED", "Protocol", "from_contract", "protocol_for", "resolve_version"]


@dataclass(frozen=True)
class Protocol:
    version: str
    pause_modes: tuple = ()  # PauseGenerationReqInput.mode choices; () = no body, pausing aborts all
    weight_version_route: bool = True  # GET /get_weight_version (else /get_model_info)
    routed_experts: bool = False  # --enable-return-routed-experts + GenerateReqInput.return_routed_experts
    selector: bool = False  # weight updates take ``selector`` (target / draft / all)
    update_session: bool = False  # /begin_weight_update ... /end_weight_update around updates
    weight_version_spans: bool = False  # meta_info["weight_versions"]: [{version, start, end}]

    def pause_mode(self, partial: bool) -> str | None:
        """The mode to send (None: send no body; the version then aborts everything)."""
        if not self.pause_modes:
            return None
        return "retract" if partial and "retract" in self.pause_modes else "abort"

    @property
    def pause_aborts(self) -> bool:
        return not self.pause_modes


KNOWN = {
    "0.5.5": Protocol("0.5.5"),
    "0.5.23": Protocol("0.5.23", pause_modes=("abort", "retract", "in_place"), weight_version_route=False,
                       routed_experts=True, selector=True, update_session=True, weight_version_spans=True),
}


def from_contract(c) -> Protocol:
    """The protocol read from a :class:`miles_ray.rollout.sglang.contract.Contract`."""
    pause = c.requests.get("PauseGenerationReqInput")
    mode = pause.fields.get("mode") if pause else None
    modes = ("abort", "retract", "in_place") if mode is not None else ()
    tensor = c.requests.get("UpdateWeightsFromTensorReqInput")
    return Protocol(c.version, pause_modes=modes,
                    weight_version_route=c.route("/get_weight_version", "GET") is not None,
                    routed_experts="return_routed_experts" in c.request("GenerateReqInput").fields
                    and "--enable-return-routed-experts" in c.flags,
                    selector=tensor is not None and "selector" in tensor.fields,
                    update_session=c.route("/begin_weight_update") is not None,
                    weight_version_spans="weight_version_spans" in c.notes)


def protocol_for(version: str) -> Protocol:
    """Known versions from :data:`KNOWN`; another one from its wheel when cached, else the
    nearest older supported version's protocol."""
    if version in KNOWN:
        return KNOWN[version]
    try:
        from miles_ray.rollout.sglang.contract import load

        return from_contract(load(version))
    except FileNotFoundError:
        older = [v for v in SUPPORTED if _key(v) <= _key(version)] or [SUPPORTED[0]]
        return replace(KNOWN[older[-1]], version=version)
