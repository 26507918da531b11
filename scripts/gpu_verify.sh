#!/usr/bin/env bash
# The one command for the GPU machine, from the repo root there, with $OUT a folder whose
# files come back:
#   nvidia-smi                          -> $OUT/nvidia-smi.txt (+ $OUT/env.txt)
#   pytest -m gpu tests/gpu     -> $OUT/gpu-tests.log (a failure does not stop us)
#   scripts/bench_gpu.py                -> $OUT/bench_gpu.json, $OUT/bench_gpu.log
# then a short summary; exits with pytest's code. Stays under ~9 minutes in all:
# GPU_VERIFY_LIMIT_S (default 530) bounds the whole, PYTEST_LIMIT_S (default 300) the tests,
# the bench gets what is left (BENCH_RUNS runs per size at most, default 10).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-verify-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LIMIT=${GPU_VERIFY_LIMIT_S:-530}
PYTEST_LIMIT=${PYTEST_LIMIT_S:-300}
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1

if ! "$PY" -c 'import pytest, pytest_timeout' 2>/dev/null; then
  if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site:$PYTHONPATH
  fi
  "$PY" -c 'import pytest' 2>/dev/null \
    || echo "gpu_verify: pytest is not importable (no .whl/ folder to install it from)" >&2
fi

{ nvidia-smi; echo; nvidia-smi topo -m; } >"$OUT/nvidia-smi.txt" 2>&1
{
  echo "date: $(date -u +%FT%TZ)  host cores: $(nproc)"
  "$PY" - <<'EOF'
import importlib, importlib.metadata as md, sys
print("python", sys.version.split()[0])
for mod, dist in (("torch", "torch"), ("pynvml", "nvidia-ml-py"), ("psutil", "psutil"),
                  ("click", "click"), ("rich", "rich"), ("pytest", "pytest"),
                  ("pytest_timeout", "pytest-timeout"), ("setproctitle", "setproctitle")):
    try:
        m = importlib.import_module(mod)
    except Exception as exc:
        print(mod, "MISSING:", exc)
        continue
    try:
        version = md.version(dist)
    except md.PackageNotFoundError:
        version = "?"
    print(mod, version, m.__file__)
try:
    import torch
    print("cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version(),
          "devices", torch.cuda.device_count())
except Exception as exc:
    print("torch cuda:", exc)
EOF
  env | grep -E '^(CUDA|NCCL|TORCH_NCCL)_' || true
} >"$OUT/env.txt" 2>&1

echo "== gpu_verify: tests (limit ${PYTEST_LIMIT} s)"
# SIGINT on overrun, so pytest still runs its teardown (which kills what the tests started).
timeout -s INT -k 30 "$PYTEST_LIMIT" \
  "$PY" -m pytest -m gpu -v -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu-tests.log"
test_rc=${PIPESTATUS[0]}

budget=$((LIMIT - SECONDS - 15))
bench_rc=skipped
if [ "$budget" -ge 45 ]; then
  echo "== gpu_verify: bench (budget ${budget} s)"
  timeout -s INT -k 30 $((budget + 60)) \
    "$PY" scripts/bench_gpu.py --json "$OUT/bench_gpu.json" --runs "${BENCH_RUNS:-10}" \
      --budget-s "$budget" 2>&1 | tee "$OUT/bench_gpu.log"
  bench_rc=${PIPESTATUS[0]}
else
  echo "gpu_verify: no time left for the bench (${budget} s)" | tee "$OUT/bench_gpu.log"
fi

echo "== gpu_verify summary (${SECONDS} s)"
grep -m1 -E '^(NVIDIA-SMI|\| NVIDIA-SMI)' "$OUT/nvidia-smi.txt" || head -n 3 "$OUT/nvidia-smi.txt"
echo "tests: exit ${test_rc}: $(grep -E '^=+ .*(passed|failed|skipped|error).* =+$' "$OUT/gpu-tests.log" | tail -n 1)"
grep -E '^(FAILED|ERROR|SKIPPED) ' "$OUT/gpu-tests.log" | head -n 20
echo "bench: exit ${bench_rc}"
sed -n '/^  size /,$p' "$OUT/bench_gpu.log" 2>/dev/null | head -n 12
exit "$test_rc"
