"""SGLang's ``load_format="flattened_bucket"`` against our strict server, over real HTTP: the
format both ways against SGLang's own FlattenedTensorMetadata dataclass, round trips (TP=2 named
per rank; TP=1 with the trainer's shm handle forwarded unopened: the CPU twin of cuda_ipc over
HTTP), malicious and inconsistent payloads refused with 400, and the config rule."""
import base64
import io
import os
import pickle
import signal
import sys
import types
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler

import pytest
import torch
from test_sglang_http import _assert_serves, _perturbed_trainer, _tokenizer

from miles_ray.rollout import sglang_tensors
from miles_ray.rollout.http_engine import HttpEngine, free_port
from miles_ray.rollout.launch import launch_server
from miles_ray.weights import ipc, to_buckets
from miles_ray.weights.sglang_flat import SGLANG_META, encode_flattened, forward_flattened, metas_for

FLAT = "flattened_bucket"


@dataclass
class FlattenedTensorMetadata:
    """SGLang's class as python/sglang/srt/weight_sync/tensor_bucket.py declares it (its fields)."""
    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


@pytest.fixture
def sglang_module(monkeypatch):
    """``sglang.srt.weight_sync.tensor_bucket`` holding the dataclass above, for this test only."""
    parts = SGLANG_META[0].split(".")
    for i in range(1, len(parts) + 1):  # the import of a dotted name needs its parents
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    FlattenedTensorMetadata.__module__ = SGLANG_META[0]
    sys.modules[SGLANG_META[0]].FlattenedTensorMetadata = FlattenedTensorMetadata
    yield FlattenedTensorMetadata
    FlattenedTensorMetadata.__module__ = __name__


def _sglang_serialize(obj) -> str:
    """python/sglang/srt/utils MultiprocessingSerializer.serialize(obj, output_str=True)."""
    buf = io.BytesIO()
    ForkingPickler(buf).dump(obj)
    return base64.b64encode(buf.getvalue()).decode()


def test_format_both_ways_against_sglangs_dataclass(sglang_module):
    """slime/Miles' sender (FlattenedTensorBucket.from_tensors: one uint8 tensor, byte offsets,
    mixed dtypes) decodes here; ours unpickles in SGLang into its dataclass and reconstructs
    (reconstruct_tensors: flat[start:end].view(dtype).reshape(shape)) to the same tensors."""
    named = [("i", torch.tensor([7, -8], dtype=torch.int64)), ("w", torch.randn(3, 4)),
             ("h", torch.arange(6, dtype=torch.float16).view(2, 3))]  # each view aligned (torch's view(dtype) rule)
    parts, metas, at = [], [], 0
    for name, t in named:
        flat = t.flatten().view(torch.uint8)
        metas.append(sglang_module(name, t.shape, t.dtype, at, at + flat.numel(), flat.numel()))
        parts.append(flat)
        at += flat.numel()
    theirs = _sglang_serialize({"flattened_tensor": torch.cat(parts), "metadata": metas})
    got = sglang_tensors.deserialize_flattened_bucket(theirs)
    assert [n for n, _ in got] == ["i", "w", "h"]
    assert all(torch.equal(a, b) and a.dtype == b.dtype for (_, a), (_, b) in zip(got, named))

    bucket = to_buckets({"a": torch.randn(2, 5), "b": torch.randn(7)}, 1)[0]
    ours = pickle.loads(base64.b64decode(encode_flattened(bucket.flat, metas_for(bucket.entries, bucket.dtype))[0]))
    assert set(ours) == {"flattened_tensor", "metadata"}
    assert all(type(m) is sglang_module and isinstance(m.shape, torch.Size) for m in ours["metadata"])
    flat = ours["flattened_tensor"]
    rebuilt = {m.name: flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape) for m in ours["metadata"]}
    assert torch.equal(rebuilt["a"], bucket.flat[:10].view(2, 5)) and torch.equal(rebuilt["b"], bucket.flat[10:])


def _server(tiny_dir, tmp_path_factory, tp):
    log = tmp_path_factory.mktemp(f"flat{tp}") / "server.log"
    extra = ["--strict-sglang", "--tp-size", str(tp), "--max-request-mb", "8"]
    return launch_server("native", tiny_dir, free_port(), "127.0.0.1", extra, log_path=str(log))


@pytest.fixture(scope="module")
def servers(tiny_dir, tmp_path_factory):
    procs, clients = zip(*[_server(tiny_dir, tmp_path_factory, tp) for tp in (2, 1)])
    yield {"tp2": clients[0], "tp1": clients[1], "tiny_dir": tiny_dir}
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)


def test_round_trip_two_tp_ranks(servers):
    """Each bucket one request, one flattened entry per TP rank; the served weights are the
    trainer's (the engine's log-probs match the trainer's)."""
    c = servers["tp2"]
    engine = HttpEngine("native", c, _tokenizer(servers["tiny_dir"]), fmt="sglang_flat", tp_size=2)
    trainer = _perturbed_trainer(servers["tiny_dir"], 11)
    buckets = to_buckets(trainer.get_weights(), 3, bucket_bytes=20000)
    assert len(buckets) > 3
    assert engine.load_buckets(buckets, 3) == 3 and c.weight_version() == 3
    _assert_serves(engine, trainer, 3)


def test_shm_handles_forwarded_unopened(servers):
    """The shm transport's path with flattened buckets: the trainer's handle (one pickle, one
    reference) goes to the server inside SGLang's payload; the forwarding side never maps it.
    Twice, over the same persistent buffers (the handles stay valid: references balance)."""
    c = servers["tp1"]
    engine = HttpEngine("native", c, _tokenizer(servers["tiny_dir"]), fmt="sglang_flat", tp_size=1)
    reader, reuse = ipc.HandleReader(), None
    for version, seed in ((4, 12), (5, 13)):
        trainer = _perturbed_trainer(servers["tiny_dir"], seed)
        buckets = to_buckets(trainer.get_weights(), version, bucket_bytes=20000, reuse=reuse)
        reuse = buckets
        received = reader.open(ipc.export_handles(buckets, "cpu"), keep=True)
        assert all(isinstance(b, ipc.HandleBucket) for b in received)
        for b in received:
            engine.load_part(b)
        assert not any(b.opened for b in received)  # never mapped by the forwarding process
        assert engine.finish_load(version) == version
        _assert_serves(engine, trainer, version)


class _Planted:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


class _MetaWithArgs:
    """Pickles as SGLang's class, but constructed with arguments (REDUCE), not as a data record."""

    def __reduce__(self):
        return _fake_meta_class(), ("x", 1, 2)


def _fake_meta_class():
    cls = type(SGLANG_META[1], (), {"__module__": SGLANG_META[0]})
    parts = SGLANG_META[0].split(".")
    for i in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    sys.modules[SGLANG_META[0]].FlattenedTensorMetadata = cls
    return cls


def _post(c, entry):
    return c.http.post(f"{c.url}/update_weights_from_tensor", json={
        "serialized_named_tensors": [entry], "load_format": FLAT, "weight_version": "77"})


def test_malicious_and_inconsistent_payloads_refused(servers, tmp_path):
    """400 naming the problem, nothing run, nothing loaded: a planted __reduce__ in the metadata,
    SGLang's class built with arguments, ranges outside the tensor, a wrong or misaligned dtype,
    an unknown name, a wrong shape; the server serves its old version afterwards."""
    c = servers["tp1"]
    before = c.weight_version()
    state = _perturbed_trainer(servers["tiny_dir"], 14).get_weights()
    name = "model.norm.weight"
    t = state[name].contiguous()
    flat, n = t.flatten(), t.numel()
    target = tmp_path / "planted"
    planted = _sglang_serialize({"flattened_tensor": flat, "metadata": [_Planted(str(target))]})
    r = _post(c, planted)
    assert r.status_code == 400 and "refused global" in r.text and "open" in r.text and not target.exists()
    try:
        r = _post(c, _sglang_serialize({"flattened_tensor": flat, "metadata": [_MetaWithArgs()]}))
    finally:
        for key in [k for k in sys.modules if k == "sglang" or k.startswith("sglang.")]:
            sys.modules.pop(key)
    assert r.status_code == 400 and "no constructor arguments" in r.text

    def meta(**kw):
        from miles_ray.weights.sglang_flat import FlatTensorMeta

        d = {"name": name, "shape": tuple(t.shape), "dtype": t.dtype, "start_idx": 0, "end_idx": n, "numel": n, **kw}
        return FlatTensorMeta(**d)

    wide = torch.cat([flat, flat])
    cases = [(flat, meta(start_idx=n, end_idx=2 * n), "not inside"),
             (flat, meta(start_idx=-1, end_idx=n - 1), "not inside"),
             (flat, meta(numel=n + 1), "not inside"),
             (flat, meta(dtype=torch.int32), "dtype"),  # the same bytes, a dtype the model does not serve
             (wide.view(torch.uint8), meta(start_idx=2, end_idx=2 + 4 * n, numel=4 * n), "aligned"),
             (flat, meta(dtype=torch.float64), "aligned"),
             (flat, meta(name="model.nope"), "does not exist"),
             (flat, meta(shape=(1, n)), "shape")]
    for tensor, m, words in cases:
        r = _post(c, encode_flattened(tensor, [m])[0])
        assert r.status_code == 400 and words in r.text, (m, r.text)
    assert c.weight_version() == before and c.health()["status"] == 200
    out = c.generate(input_ids=[5, 6], sampling_params={"max_new_tokens": 2})
    assert out["meta_info"]["weight_version"] == str(before)


def test_forward_refuses_a_handle_that_is_not_a_tensor():
    with pytest.raises(pickle.UnpicklingError, match="not a torch tensor handle.*open"):
        forward_flattened(pickle.dumps(_Planted("/nonexistent/x")), [])


def test_config_cuda_ipc_over_http_only_forwarded(tmp_path):
    from miles_ray.config import load_config

    base = [f"output_dir={tmp_path}", "rollout.backend=native", "rollout.serve_http=true",
            "rollout.strict_sglang=true", "weight_sync.transport=cuda_ipc", "cluster.local_num_gpus=1"]
    with pytest.raises(ValueError, match="sglang_load_format=flattened_bucket"):
        load_config(None, base + ["cluster.colocate=true", "cluster.use_gpu=true"])
    with pytest.raises(ValueError, match="cluster.colocate=true"):
        load_config(None, base + ["weight_sync.sglang_load_format=flattened_bucket"])
    cfg = load_config(None, base + ["cluster.colocate=true", "cluster.use_gpu=true",
                                    "weight_sync.sglang_load_format=flattened_bucket"])
    assert cfg.weight_sync.transport == "cuda_ipc" and cfg.weight_sync.sglang_load_format == FLAT
