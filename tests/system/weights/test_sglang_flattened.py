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

from miles_ray.weights import sglang_tensor as sglang_tensors
from miles_ray.rollout.http.engine import HttpEngine, free_port
from miles_ray.rollout.http.launch import launch_server
from miles_ray.weights import ipc, to_buckets
from miles_ray.weights.sglang_flattened import (SGLANG_META, deserialize_flattened_bucket, encode_flattened,
                                                forward_flattened, metas_for)
from tests.helpers.engine_checks import assert_serves, perturbed_trainer, tokenizer_of

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
    got = deserialize_flattened_bucket(theirs)
    assert [n for n, _ in got] == ["i", "w", "h"]
    assert all(torch.equal(a, b) and a.dtype == b.dtype for (_, a), (_, b) in zip(got, named))

    bucket = to_buckets({"a": torch.randn(2, 5), "b": torch.randn(7)}, 1)[0]
    # SGLang's side of the format is plain pickle (MultiprocessingSerializer); here it reads bytes this
    # test encoded a line above, in this process: never data from a network or another user's file
    ours = pickle.loads(base64.b64decode(encode_flattened(bucket.flat, metas_for(bucket.entries, bucket.dtype))[0]))
    assert set(ours) == {"flattened_tensor", "metadata"}
    assert all(type(m) is sglang_module and isinstance(m.shape, torch.Size) for m in ours["metadata"])
    flat = ours["flattened_tensor"]
    rebuilt = {m.name: flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape) for m in ours["metadata"]}
    assert torch.equal(rebuilt["a"], bucket.flat[:10].view(2, 5)) and torch.equal(rebuilt["b"], bucket.flat[10:])


def _server(tiny_dir, tmp_path_factory, tp):
    log = tmp_path_factory.mktemp(f"flat{tp}") / "server.log"
    extra = ["--strict-sglang", "--tp-size", str(tp), "--max-request-mb", "8"]
    proc, client = launch_server("native", tiny_dir, free_port(), "127.0.0.1", extra, log_path=str(log))
    client.begin_weight_update()  # the newest SGLang loads weights only inside a session (left open here)
    return proc, client


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
    engine = HttpEngine("native", c, tokenizer_of(servers["tiny_dir"]), fmt="sglang_flattened", tp_size=2)
    trainer = perturbed_trainer(servers["tiny_dir"], 11)
    buckets = to_buckets(trainer.get_weights(), 3, bucket_bytes=20000)
    assert len(buckets) > 3
    assert engine.load_buckets(buckets, 3) == 3 and c.weight_version() == 3
    assert_serves(engine, trainer, 3)


def test_shm_handles_forwarded_unopened(servers):
    """The shm transport's path with flattened buckets: the trainer's handle (one pickle, one
    reference) goes to the server inside SGLang's payload; the forwarding side never maps it.
    Twice, over the same persistent buffers (the handles stay valid: references balance)."""
    c = servers["tp1"]
    engine = HttpEngine("native", c, tokenizer_of(servers["tiny_dir"]), fmt="sglang_flattened", tp_size=1)
    reader, reuse = ipc.HandleReader(), None
    for version, seed in ((4, 12), (5, 13)):
        trainer = perturbed_trainer(servers["tiny_dir"], seed)
        buckets = to_buckets(trainer.get_weights(), version, bucket_bytes=20000, reuse=reuse)
        reuse = buckets
        received = reader.open(ipc.export_handles(buckets, "cpu"), keep=True)
        assert all(isinstance(b, ipc.HandleBucket) for b in received)
        for b in received:
            engine.load_part(b)
        assert not any(b.opened for b in received)  # never mapped by the forwarding process
        assert engine.finish_load(version) == version
        assert_serves(engine, trainer, version)


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
    state = perturbed_trainer(servers["tiny_dir"], 14).get_weights()
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
        from miles_ray.weights.sglang_flattened import FlatTensorMeta

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


class _CudaHandle:
    """What ``ForkingPickler.dumps(cuda_tensor)`` holds (torch reductions.reduce_tensor, CUDA branch):
    rebuild_cuda_tensor(cls, size, stride, offset, storage_cls, dtype, device, handle, storage bytes,
    storage offset, requires_grad, ref counter handle, ref counter offset, event handle, event sync)."""
    ARGS = (torch.Tensor, torch.Size([6]), (1,), 0, torch.storage.TypedStorage, torch.float32, 0, b"\x01" * 64, 24,
            0, False, b"/torch_ref_counter", 3, b"\x02" * 64, True)

    def __reduce__(self):
        import torch.multiprocessing.reductions as reductions

        return reductions.rebuild_cuda_tensor, self.ARGS


class _Capture(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"):
            return lambda *args: ("rebuild_cuda_tensor", args)
        return super().find_class(module, name)


def test_cuda_handle_forwarded_verbatim_cpu(sglang_module):
    """The cuda_ipc path on CPU, up to the CUDA call: a CUDA IPC handle pickle is forwarded with
    the same rebuild call and arguments (nothing opened), and a CUDA-less strict decoder refuses
    it by name (on a GPU it maps the trainer's memory: tests/system/gpu/test_gpu.py)."""
    metas = metas_for([("a", (2, 3), 0, 6)], torch.float32)
    entry = forward_flattened(ForkingPickler.dumps(_CudaHandle()), metas)
    got = _Capture(io.BytesIO(base64.b64decode(entry))).load()
    assert got["flattened_tensor"] == ("rebuild_cuda_tensor", _CudaHandle.ARGS)
    assert [(m.name, tuple(m.shape), m.start_idx, m.end_idx) for m in got["metadata"]] == [("a", (2, 3), 0, 6)]
    if not torch.cuda.is_available():
        with pytest.raises(sglang_tensors.RefusedPayload, match="no CUDA device"):
            deserialize_flattened_bucket(entry)


def test_decoder_property_views_inside_and_exact():
    """Hypothesis: any metadata either is refused (RefusedPayload) or yields views lying inside
    the flattened tensor with exactly the metadata's name, shape and dtype."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from miles_ray.weights.sglang_flattened import FlatTensorMeta

    flat = torch.arange(64, dtype=torch.float32)
    ints = st.integers(-3, 300)
    meta = st.builds(FlatTensorMeta, st.sampled_from(["a", "b", "a"]),
                     st.lists(st.integers(0, 9), max_size=3).map(tuple),
                     st.sampled_from([torch.float32, torch.float16, torch.int64, torch.uint8]), ints, ints, ints)

    @settings(max_examples=400, deadline=None, derandomize=True, database=None)
    @given(st.lists(meta, min_size=1, max_size=3), st.sampled_from([flat, flat.view(torch.uint8), flat.half()]))
    def run(metas, tensor):
        try:
            got = deserialize_flattened_bucket(encode_flattened(tensor, metas)[0])
        except sglang_tensors.RefusedPayload:
            return
        base, end = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
        for m, (name, t) in zip(metas, got):
            assert name == m.name and tuple(t.shape) == m.shape and t.dtype == m.dtype
            assert t.numel() == 0 or base <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= end

    run()


@pytest.mark.ray
def test_ray_sync_flattened_object_store_and_forwarded_shm(local_ray, tmp_path, model_cache):
    """On Ray: a strict engine (one TP rank) with weight_sync.sglang_load_format=flattened_bucket;
    object_store buckets posted as flattened buckets, then shm twice (the engine actor forwards the
    trainer's handles unopened; the second sync reuses the adopted buffers); after each sync the
    engine serves the new version and its log-probs match the trainer's."""
    import ray

    from jobs.cluster import start_actors, stop_actors
    from jobs.weight_sync import WeightSync
    from miles_ray.config import load_config
    from miles_ray.data import synthetic_rows, validate_rows
    from miles_ray.models import load_tokenizer
    from miles_ray.rollout import SamplingParams
    from miles_ray.training.sft import sft_samples

    cfg = load_config(None, [f"output_dir={tmp_path}/run", f"model.tiny_cache_dir={model_cache}",
                             "logging.progress_bar=false", "logging.wandb=false", "rollout.backend=native",
                             "rollout.serve_http=true", "rollout.strict_sglang=true", "run_name=flat",
                             "weight_sync.bucket_mb=0.05", f"weight_sync.sglang_load_format={FLAT}"])
    actors = start_actors(cfg)
    try:
        engine, tok = actors.engines[0], load_tokenizer("tiny:qwen3", model_cache)
        items, _ = validate_rows(synthetic_rows("arithmetic", 8, 9, 0), tok)
        reqs = [{"prompt": i.prompt, "label": i.label, "prompt_index": i.index, "group_id": k}
                for k, i in enumerate(items)]
        for version, transport in enumerate(["object_store", "shm", "shm"], start=2):
            actors.policy.sft_step(sft_samples(items, tok), 1e-2)  # move the weights
            WeightSync(actors, transport).sync(version)
            assert ray.get(engine.health.remote()) == {"state": "ready", "weight_version": version}
            samples = ray.get(engine.generate.remote(reqs[:4], 2, SamplingParams(6)))
            assert {s.weight_version for s in samples} == {version}
            prepared = actors.policy.scatter("prepare", samples)
            diffs = [abs(a - b) for s in prepared for a, b in zip(s.old_logprobs, s.response_logprobs)]
            assert max(diffs) < 1e-5, (transport, max(diffs))
    finally:
        stop_actors(actors)
