#!/usr/bin/env bash
# Download (never install) the SGLang wheels whose contract miles_ray.rollout.sglang.contract reads:
# 0.5.5 (the oldest we support) and the newest release on PyPI. --no-deps keeps it to the wheels.
# Idempotent: a version already in the cache is skipped. Never fails: a failed download only makes
# tests/unit/rollout/sglang/test_contract.py skip for that version.
# The newest version is asked of PyPI once and remembered in $CACHE/NEWEST; SGLANG_WHEELS_REFRESH=1 asks again.
# Usage: scripts/fetch_sglang_wheels.sh [VERSION...]   (cache: $SGLANG_WHEEL_CACHE or .cache/sglang-wheels)
set -uo pipefail
cd "$(dirname "$0")/.."
CACHE=${SGLANG_WHEEL_CACHE:-.cache/sglang-wheels}
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
mkdir -p "$CACHE"
versions=("$@")
if [ ${#versions[@]} -eq 0 ]; then
  newest=$(cat "$CACHE/NEWEST" 2>/dev/null || true)
  if [ -z "$newest" ] || [ -n "${SGLANG_WHEELS_REFRESH:-}" ]; then
    asked=$(timeout 60 "$PY" -m pip index versions sglang 2>/dev/null | sed -n 's/^sglang (\(.*\))$/\1/p' | head -1)
    if [ -n "$asked" ]; then newest=$asked; echo "$newest" > "$CACHE/NEWEST"; fi
  fi
  versions=(0.5.5 ${newest:+"$newest"})
fi
for v in "${versions[@]}"; do
  if ls "$CACHE"/sglang-"$v"-*.whl >/dev/null 2>&1; then
    continue
  fi
  echo "[fetch_sglang_wheels] downloading sglang==$v (no deps) into $CACHE"
  if ! timeout 300 "$PY" -m pip download -q --no-deps --only-binary=:all: "sglang==$v" -d "$CACHE" >/dev/null 2>&1 \
     && ! timeout 300 "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
          --platform manylinux_2_34_x86_64 "sglang==$v" -d "$CACHE" >/dev/null 2>&1; then
    echo "[fetch_sglang_wheels] warning: could not download sglang==$v; its contract tests will skip" >&2
  fi
done
exit 0
