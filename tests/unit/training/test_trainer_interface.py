"""Both training backends present the one trainer interface (miles_ray/training/interface.py):
every method, with the interface's parameter names, so the actor never branches on the backend."""
import inspect

import pytest

from miles_ray.training.interface import METHODS, PolicyTrainerBackend


def _backends():
    from miles_ray.training.fsdp import PolicyTrainer
    from miles_ray.training.megatron.trainer import MegatronPolicyTrainer

    return [PolicyTrainer, MegatronPolicyTrainer]


def _params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


@pytest.mark.parametrize("backend", _backends(), ids=lambda c: c.__name__)
def test_backend_implements_every_method_with_the_interface_parameters(backend):
    for name in METHODS:
        assert callable(getattr(backend, name, None)), f"{backend.__name__} lacks {name}"
        assert _params(getattr(backend, name)) == _params(getattr(PolicyTrainerBackend, name)), name


def test_interface_lists_every_protocol_method():
    declared = {n for n, v in vars(PolicyTrainerBackend).items() if callable(v) and not n.startswith("_")}
    assert declared == set(METHODS)


def test_a_class_missing_a_method_is_caught():
    class Partial:
        version = 0

        def prepare(self, samples, old=True):
            return samples

    assert not isinstance(Partial(), PolicyTrainerBackend)
    assert [m for m in METHODS if not hasattr(Partial, m)] == [m for m in METHODS if m != "prepare"]
