import os
import sys
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    _order_modules(items)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """Folder holding tiny models written once per session (``tiny:<arch>`` specs resolve here)."""
    return str(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_dir(model_cache):
    from miles_ray.models.loading import resolve_model_path

    return resolve_model_path("tiny:qwen3", model_cache)["path"]


@pytest.fixture(scope="session")
def tokenizer(model_cache):
    from miles_ray.models import load_tokenizer

    return load_tokenizer("tiny:qwen3", model_cache)


# One local Ray per kind (fake GPUs or none), shared by every module that asks for it: the modules
# asking for ``local_ray`` run one after another (collection order below), then those asking for
# ``local_ray_gpus``, so Ray starts twice per session instead of once per module. A module that
# asks for neither gets no Ray in the pytest process (its tests may start their own Ray, cluster or
# job): the shared one is shut down before it. After each module using it, nothing of the module
# may be left in the shared Ray (actors alive, placement groups not removed): checked below.
SHARED_RAY_FIXTURES = {"local_ray": 1, "local_ray_gpus": 2}  # -> group in the collection order
_SHARED = {"num_gpus": None}  # the Ray this file started (None: none)


def _module_group(item) -> int:
    return max((SHARED_RAY_FIXTURES.get(name, 0) for name in item.fixturenames), default=0)


def _order_modules(items) -> None:
    """Stable reorder: modules without the shared Ray first, then the ``local_ray`` modules, then
    the ``local_ray_gpus`` ones; tests keep their order inside a module."""
    groups, first = {}, {}
    for i, item in enumerate(items):
        mod = item.module.__name__ if item.module else item.nodeid
        groups[mod] = max(groups.get(mod, 0), _module_group(item))
        first.setdefault(mod, i)
    items.sort(key=lambda it: (groups[it.module.__name__ if it.module else it.nodeid],
                               first[it.module.__name__ if it.module else it.nodeid]))


def _ray_down() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _SHARED["num_gpus"] = None


def _ray_up(num_gpus: int) -> None:
    import ray

    if ray.is_initialized() and _SHARED["num_gpus"] == num_gpus:
        return
    _ray_down()
    ray.init(address="local", num_cpus=8, num_gpus=num_gpus, include_dashboard=False)
    _SHARED["num_gpus"] = num_gpus


def _leftovers(timeout_s: float = 30.0) -> list:
    """Actors not dead and placement groups not removed in the shared Ray (``ray.kill`` and group
    removal are asynchronous: waited for up to ``timeout_s``)."""
    import time

    from ray._private.state import actors
    from ray.util import placement_group_table

    deadline = time.time() + timeout_s
    while True:
        left = [f"actor {a.get('Name') or a['ActorID']} ({a['State']})" for a in actors().values()
                if a["State"] != "DEAD"]
        left += [f"placement group {g['name'] or g['placement_group_id']} ({g['state']})"
                 for g in placement_group_table().values() if g["state"] != "REMOVED"]
        if not left or time.time() > deadline:
            return left
        time.sleep(0.2)


def _shared_ray(num_gpus: int):
    _ray_up(num_gpus)
    yield
    left = _leftovers()
    if left:  # the next module gets a fresh Ray, this one fails its teardown
        _ray_down()
        raise AssertionError(f"left running in the shared Ray after the module: {left}")


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray (8 CPUs, no GPUs), shared by the modules that ask for it; a module must leave
    no actor or placement group running in it."""
    yield from _shared_ray(0)


@pytest.fixture(scope="module")
def local_ray_gpus():
    """As ``local_ray`` with 4 fake GPUs (placement tests)."""
    yield from _shared_ray(4)


@pytest.fixture(scope="module", autouse=True)
def _no_shared_ray_unless_asked(request):
    """A module that asks for no shared Ray runs without one in the pytest process."""
    mine = [item for item in request.session.items if getattr(item, "module", None) is request.module]
    if "ray" in sys.modules and not any(_module_group(item) for item in mine):
        _ray_down()
    yield


@pytest.fixture(scope="session", autouse=True)
def _ray_down_at_end():
    yield
    if _SHARED["num_gpus"] is not None:
        _ray_down()
