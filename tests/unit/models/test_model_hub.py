"""model.path as a Hugging Face Hub id: the HF cache is honoured (a real hub cache layout, offline)."""
import os
import subprocess
import sys
import textwrap

from miles_ray.models.loading import HUB_ID

SCRIPT = textwrap.dedent("""
    import sys
    from miles_ray.errors import UserPathError
    from miles_ray.models.loading import load_model, load_tokenizer, resolve_model_path
    where = resolve_model_path("miles-test/tiny-qwen3")
    model = load_model("miles-test/tiny-qwen3@main")
    tok = load_tokenizer("miles-test/tiny-qwen3")
    print("FOLDER", where["path"], model.config.model_type, tok("1+2").input_ids[:2])
    try:
        resolve_model_path("miles-test/not-cached")
    except UserPathError as err:
        print("ERROR", err)
""")


def _fake_hub_cache(root, tmp_path):
    """The layout huggingface_hub's cache uses: models--org--name/{refs/main, snapshots/<sha>/}."""
    from miles_ray.models.tiny import write_tiny_model

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = root / "models--miles-test--tiny-qwen3"
    write_tiny_model(repo / "snapshots" / sha, arch="qwen3", hidden=64, layers=1)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    return repo / "snapshots" / sha


def test_hub_id_resolves_from_the_cache_offline(tmp_path):
    snapshot = _fake_hub_cache(tmp_path / "hub", tmp_path)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    folder_line = next(line for line in out.stdout.splitlines() if line.startswith("FOLDER"))
    assert folder_line.split()[1] == str(snapshot.resolve()) and "qwen3" in folder_line
    err = next(line for line in out.stdout.splitlines() if line.startswith("ERROR"))
    assert "model.path='miles-test/not-cached'" in err and "Hub id" in err and "local folder" in err


def test_hub_id_pattern():
    assert HUB_ID.fullmatch("Qwen/Qwen3-0.6B") and HUB_ID.fullmatch("org/name@v1.0")
    for local in ("tiny:qwen3", "smollm2", "/abs/path", "a/b/c"):
        assert not HUB_ID.fullmatch(local), local
