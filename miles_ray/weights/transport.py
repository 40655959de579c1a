"""The two interfaces of weight sync: :class:`WeightTransport` (trainer rank 0 -> engines, named by
``weight_sync.transport``) and :class:`PayloadFormat` (engine actor -> engine server over HTTP).

A sync, the same for every transport (driven by ``jobs/weight_sync.py``; the actors only forward):

1. Set-up, on the first sync and again after a reset (restarted engine, rebuilt trainer group):
   trainer rank 0 and every engine report where they are (a *place*: ``node_id``, and for rank 0
   ``addr``, a free ``port`` and the torch.distributed ``backend``; an engine adds
   :meth:`WeightTransport.describe`). :meth:`WeightTransport.plan` turns the places into open
   arguments (or raises: e.g. a same-node transport across nodes); rank 0 then runs
   :meth:`~WeightTransport.open_sender` and every engine :meth:`~WeightTransport.open_receiver`
   together (a collective group forms here). ``plan`` returning None: nothing to open.
2. Trainer rank 0 packs the weights into :class:`~miles_ray.weights.buckets.Bucket` s (on the CPU,
   or on its accelerator when ``to_cpu`` is False) and, bucket by bucket, yields
   ``export(bucket)`` (the *payload*, which Ray hands to every engine) and then runs
   ``push(bucket)`` (the collective part of a move, e.g. a broadcast; nothing for point-to-point
   transports). After the last bucket: :meth:`~WeightTransport.finish_export`.
3. Every engine gets the payloads in order: ``receive(payload, engine)`` (by default
   ``engine.load_part(load(payload))``); then ``finish_load(version)`` checks that every weight
   arrived and serves the version.

Invariant (tested for every built-in transport and the plug-in example): after ``export`` ->
``load`` of every bucket, the engine's weights equal the trainer's bit for bit.

A transport is one module: a subclass registered in :data:`miles_ray.weights.registry.WEIGHT_TRANSPORTS`
(or named by its import path ``pkg.module:Class``). No Ray here: payloads must be picklable (Ray
moves them), everything else happens in the trainer and engine processes.
"""
from __future__ import annotations

from typing import Any

from miles_ray.weights.buckets import Bucket


class WeightTransport:
    """One way of moving buckets from trainer rank 0 to the engines; one instance per process and
    transport (state such as a group or handles lives on it until :meth:`release`)."""

    to_cpu: bool = True  # where trainer rank 0 packs the buckets (False: on its accelerator)

    # -- driver (pure functions of the config and the places) -----------------------------------
    @classmethod
    def config_problem(cls, cfg) -> str | None:
        """Why this transport cannot serve ``cfg`` (a message naming the keys to change), or None."""
        return None

    @classmethod
    def plan(cls, sender: dict, receivers: list[dict]) -> tuple[dict, list[dict]] | None:
        """Open arguments ``(for rank 0, [for each engine])`` from the parties' places, or None
        when there is nothing to open. Raise (RuntimeError) when the layout cannot work."""
        return None

    # -- trainer rank 0 -------------------------------------------------------------------------
    def open_sender(self, args: dict) -> None:
        """Join / create what the transport needs (``args``: from :meth:`plan`)."""

    def export(self, bucket: Bucket) -> Any:
        """The payload for ``bucket`` (picklable; Ray gives it to every engine)."""
        raise NotImplementedError

    def push(self, bucket: Bucket) -> None:
        """After ``bucket``'s payload went out: the collective part of the move (if any)."""

    def finish_export(self, trainer) -> None:
        """After the last bucket of a version (``trainer``: the rank's library trainer)."""

    # -- engine ---------------------------------------------------------------------------------
    def describe(self, engine) -> dict:
        """What :meth:`plan` needs to know about this engine (added to its place)."""
        return {}

    def open_receiver(self, args: dict, engine) -> None:
        """Join / open what the transport needs on this engine (``args``: from :meth:`plan`)."""

    def load(self, payload: Any) -> Bucket:
        """The bucket a payload carries (inverse of :meth:`export`)."""
        raise NotImplementedError

    def receive(self, payload: Any, engine) -> None:
        """Load one payload into ``engine`` (anything with ``load_part(bucket)``); the engine is
        STALE until its ``finish_load``."""
        engine.load_part(self.load(payload))

    def release(self) -> None:
        """Drop what this side holds (group, handles, kept buffers); the next sync opens again."""


class PayloadFormat:
    """A body of an engine server's ``/update_weights_from_tensor`` carrying one bucket: the engine
    actor builds it (:meth:`body`), the server decodes it (:meth:`decode`). Stateless: the
    registry holds the classes (:data:`miles_ray.weights.registry.WEIGHT_FORMATS`)."""

    load_format: str | None = None  # the body's ``load_format``
    sglang_api: bool = True  # SGLang (and our strict server) accepts it; False: our lenient server only

    @classmethod
    def body(cls, bucket: Bucket, tp_size: int) -> dict:
        """The request body (JSON) for one bucket, for an engine of ``tp_size`` ranks."""
        raise NotImplementedError

    @classmethod
    def decode(cls, body: dict, tp_size: int) -> list:
        """Server side: ``[(name, tensor)]`` from a body (raises a client error when malformed)."""
        raise NotImplementedError
