"""A weight transport is one file: the toy of ``tests/helpers/toy_transport.py`` (bytes + checksum),
named by its import path or registered under a name, moves a real trainer's weights into a real
engine model bit for bit through the same calls the actors make (no Ray here); so do the built-in
transports through the same interface."""
import concurrent.futures as cf
import pickle

import pytest
import torch

from tests.helpers.toy_transport import ChecksumTransport
from miles_ray.weights import WEIGHT_TRANSPORTS, weight_transport
from tests.helpers.engine_checks import perturbed_trainer

TOY = "tests.helpers.toy_transport:ChecksumTransport"


@pytest.fixture(scope="module")
def trainer(tiny_dir):
    return perturbed_trainer(tiny_dir, 7)  # weights the engine does not have yet


def _engine(tiny_dir):
    from miles_ray.models import load_model
    from miles_ray.rollout.engine_weights import EngineWeights

    return EngineWeights(load_model(tiny_dir))


def _sync(trainer, engine, spec: str, version: int) -> int:
    """What jobs/weight_sync.py drives and the actors forward: set-up plan, then per bucket export
    (rank 0) -> the payload (pickled, as Ray moves it) -> receive (engine), push, finish."""
    cls = weight_transport(spec)
    sender, receiver = cls(), cls()
    place = {"node_id": "n0", "addr": "127.0.0.1", "port": _free_port(), "backend": "gloo"}
    plan = cls.plan(place, [{"node_id": "n0", **receiver.describe(engine)}])
    with cf.ThreadPoolExecutor(2) as pool:
        if plan is not None:  # opened together: a collective group forms here
            opened = pool.submit(sender.open_sender, plan[0])
            receiver.open_receiver(plan[1][0], engine)
            opened.result(30)
        state = trainer.engine_state(to_cpu=cls.to_cpu)
        for bucket in trainer.iter_export(state, version, 20000):  # many small buckets
            payload = sender.export(bucket)
            payload = pickle.loads(pickle.dumps(payload))  # our own bytes, in-process
            received = pool.submit(receiver.receive, payload, engine)
            sender.push(bucket)
            received.result(30)
        sender.finish_export(trainer)
    served = engine.finish_load(version)
    sender.release()
    receiver.release()
    return served


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_bitwise_equal(engine, trainer) -> None:
    live = trainer.engine_state()
    served = engine.model.state_dict()
    assert set(served) == set(live)
    assert all(torch.equal(served[n], live[n]) and served[n].dtype == live[n].dtype for n in live)


# broadcast builds its group the way SGLang does (one named group per process): its sender and
# receiver need two processes, covered by tests/system/jobs/test_ray_local.py and
# tests/system/rollout/sglang/test_sglang_group.py
@pytest.mark.parametrize("spec", [TOY, "object_store", "shm"])
def test_transport_moves_weights_bit_for_bit(trainer, tiny_dir, spec):
    engine = _engine(tiny_dir)
    before = engine.model.state_dict()
    assert any(not torch.equal(before[n], t) for n, t in trainer.engine_state().items())  # something to move
    assert _sync(trainer, engine, spec, 3) == 3
    assert engine.health() == {"state": "ready", "weight_version": 3}
    _assert_bitwise_equal(engine, trainer)


def test_toy_checksum_refuses_a_corrupted_bucket_and_the_engine_does_not_serve(trainer, tiny_dir):
    from miles_ray.rollout.health import EngineNotReady

    engine, toy = _engine(tiny_dir), ChecksumTransport()
    buckets = list(trainer.iter_export(trainer.engine_state(), 4, 20000))
    payload = toy.export(buckets[0])
    engine.load_part(toy.load(payload))  # a good bucket: loading, not yet serving
    bad = toy.export(buckets[1])
    bad["data"] = bytes([bad["data"][0] ^ 1]) + bad["data"][1:]
    with pytest.raises(ValueError, match="checksum mismatch"):
        toy.receive(bad, engine)
    with pytest.raises(EngineNotReady):
        engine.require_ready()
    with pytest.raises(ValueError, match="missing"):  # an incomplete version is never served
        engine.finish_load(4)


def test_toy_by_import_path_or_registered_name(tmp_path):
    from miles_ray.config import load_config

    assert weight_transport(TOY) is ChecksumTransport
    cfg = load_config(None, [f"output_dir={tmp_path}", f"weight_sync.transport={TOY}"])
    assert cfg.weight_sync.transport == TOY
    WEIGHT_TRANSPORTS.register("checksum_toy")(ChecksumTransport)  # or give it a name: one line
    try:
        assert weight_transport("checksum_toy") is ChecksumTransport
        assert load_config(None, [f"output_dir={tmp_path}", "weight_sync.transport=checksum_toy"])
    finally:
        WEIGHT_TRANSPORTS.pop("checksum_toy")


@pytest.mark.parametrize("spec, words", [
    ("nope", "weight_sync.transport='nope' is not a registered weight transport"),
    ("tests.helpers.toy_transport:Missing", "has no function or class 'Missing'"),
    ("tests.helpers.no_such_module:Toy", "cannot import module 'tests.helpers.no_such_module'"),
    ("tests.helpers.toy_transport:not_a_transport", "has no export(), load() (attribute missing)"),
    ("tests.helpers.toy_transport:NotDerived", "not a class derived from miles_ray.weights.WeightTransport"),
])
def test_a_bad_transport_fails_with_the_config_naming_it(tmp_path, spec, words):
    from miles_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, [f"output_dir={tmp_path}", f"weight_sync.transport={spec}"])
    assert words in str(err.value) and "\n" not in str(err.value)


def test_cuda_ipc_rules_come_from_its_module(tmp_path):
    """A transport's own config rules (``config_problem``) run with the config: cuda_ipc needs colocated GPUs."""
    from miles_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="cuda_ipc needs cluster.colocate=true and cluster.use_gpu=true"):
        load_config(None, [f"output_dir={tmp_path}", "weight_sync.transport=cuda_ipc"])


def test_same_node_transports_refuse_engines_on_other_nodes():
    for spec in ("shm", "cuda_ipc"):
        with pytest.raises(RuntimeError, match=f"weight_sync.transport={spec} needs the engines on the node"):
            weight_transport(spec).plan({"node_id": "a"}, [{"node_id": "a"}, {"node_id": "b"}])
        assert weight_transport(spec).plan({"node_id": "a"}, [{"node_id": "a"}]) is None
