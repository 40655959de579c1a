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


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance (8 CPUs) for the tests of one module; shut down after it."""
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False)
    yield
    ray.shutdown()
