"""GPU check: SGLang's update_weights_from_tensor payload with CUDA IPC handles, made by our client
(serialize_named_tensors) and decoded in another process by the allow-list unpickler."""
import json, subprocess, sys, torch
from miles_ray.weights.sglang_tensor import serialize_named_tensors, deserialize_named_tensors, RefusedPayload
if sys.argv[1:] == ["child"]:
    entries = json.loads(sys.stdin.read())
    out = []
    for e in entries:
        named = deserialize_named_tensors(e)
        out.append({n: [str(t.device), float(t.double().sum()), list(t.shape)] for n, t in named})
    print(json.dumps(out))
    sys.exit(0)
flat = torch.arange(24, dtype=torch.bfloat16, device="cuda")
named = [("a", flat[:12].view(3, 4)), ("b", flat[12:])]
entries = serialize_named_tensors(named, tp_size=2)
r = subprocess.run([sys.executable, __file__, "child"], input=json.dumps(entries), capture_output=True, text=True)
print("child rc", r.returncode, r.stdout.strip()[-400:], r.stderr.strip()[-800:])
ok = r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])[1]["a"][1] == float(flat[:12].double().sum())
import base64, pickle
class Evil:
    def __reduce__(self): return (print, ("pwned",))
try:
    deserialize_named_tensors(base64.b64encode(pickle.dumps([("a", Evil())])).decode()); refused = False
except RefusedPayload as e:
    refused = "refused global" in str(e)
print(f"RESULT cuda_ipc_roundtrip={ok} evil_refused={refused} torch={torch.__version__} gpu={torch.cuda.get_device_name(0)}")
