"""Trainer ranks: TrainerActor (policy) and CriticActor (value model). Each wraps one library
trainer; a :class:`actors.group.RankGroup` forms the torch.distributed group across ranks."""
from __future__ import annotations

import socket

import ray

from actors.common import ActorBase, dist_backend, setup_worker_process
from miles_ray.config import Config


class _RankActor(ActorBase):
    def __init__(self, cfg: dict, rank: int, world_size: int):
        self.cfg = Config.model_validate(cfg)
        self.rank, self.world_size = rank, world_size
        setup_worker_process(self.cfg.seed + rank, self.cfg, "trainer")
        self.trainer = None
        self.transports: dict = {}  # weight_sync.transport -> this rank's side (TrainerActor)

    def master_address(self) -> tuple[str, int]:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, master_addr: str | None, master_port: int | None) -> bool:
        """Join the data-parallel group (when world_size > 1), then build the trainer."""
        if self.world_size > 1:
            from miles_ray.training.collectives import init_distributed

            init_distributed(self.rank, self.world_size, master_addr, master_port, dist_backend(self.cfg))
        self.trainer = self.build()
        return True

    def train_step(self, minibatches: list) -> dict:
        self.fault_point(f"rank {self.rank}'s train_step")
        return self.trainer.train_step(minibatches)

    def save_state(self, folder: str, role: str) -> str:
        """Collective: this rank's shards of ``<folder>/<role>`` (sharded, any world size on load)."""
        self.trainer.save_checkpoint(f"{folder}/{role}")
        return f"{folder}/{role}"

    def load_state(self, folder: str, role: str) -> int:
        self.trainer.load_checkpoint(f"{folder}/{role}")
        return self.rank

    def offload_optimizer(self) -> None:
        self.trainer.offload_optimizer()

    def reload_optimizer(self) -> None:
        self.trainer.reload_optimizer()


@ray.remote
class TrainerActor(_RankActor):
    def build(self):
        from miles_ray.training.backends import build_policy_trainer

        return build_policy_trainer(self.cfg)  # train.backend: fsdp | megatron

    def prepare(self, samples: list, old: bool = True) -> list:
        return self.trainer.prepare(samples, old)

    def sft_step(self, samples: list, lr=None) -> dict:
        return self.trainer.sft_step(samples, lr=lr)

    def version(self) -> int:
        return self.trainer.version

    def export_hf(self, folder: str) -> bool:
        """The policy as an HF folder that ``transformers`` loads (rank 0 writes; all ranks gather)."""
        self.trainer.save_hf(folder)
        if self.cfg.train.qat == "int4":  # and the quantized checkpoint inference engines load
            self.trainer.save_w4a16(f"{folder}-w4a16")
        return True

    # -- weight export over a transport (miles_ray.weights; driven by jobs/weight_sync.py) --------
    def _transport(self, name: str):
        """This rank's side of the transport ``name`` (one instance per name, kept across syncs)."""
        from miles_ray.weights.registry import weight_transport

        if name not in self.transports:
            self.transports[name] = weight_transport(name)()
        return self.transports[name]

    def transport_place(self, name: str) -> dict:
        """Where this rank is, for the transport's set-up plan: node, address, a free port, backend."""
        addr, port = self.master_address()
        return {"node_id": ray.get_runtime_context().get_node_id(), "addr": addr, "port": port,
                "backend": dist_backend(self.cfg)}

    def open_transport(self, name: str, args: dict) -> bool:
        transport = self._transport(name)
        transport.release()
        transport.open_sender(args)
        return True

    def stream_export(self, version: int, name: str):
        """Generator (call with num_returns="streaming"): one payload per bucket as soon as it is
        packed, so engines load bucket k while bucket k+1 is packed; the transport's collective part
        (``push``) runs after each payload went out. Other ranks only take part in the gathers."""
        transport = self._transport(name)
        state = self.trainer.engine_state(to_cpu=transport.to_cpu)
        if state is None:
            return
        for bucket in self.trainer.iter_export(state, version, _bucket_bytes(self.cfg)):
            yield transport.export(bucket)
            transport.push(bucket)
        transport.finish_export(self.trainer)


@ray.remote
class CriticActor(_RankActor):
    def build(self):
        from miles_ray.models import load_tokenizer
        from miles_ray.training.fsdp.critic import CriticTrainer

        c = self.cfg
        pad = load_tokenizer(c.model.path, c.model.tiny_cache_dir).pad_token_id or 0
        return CriticTrainer(c.model.path, c.train, c.model.dtype, c.model.tiny_cache_dir, pad_id=pad, seed=c.seed,
                             schedule_steps=c.optimizer_steps)

    def compute_values(self, samples: list) -> list:
        return self.trainer.compute_values(samples)


def _bucket_bytes(cfg) -> int:
    return int(cfg.weight_sync.bucket_mb * (1 << 20))

