#!/usr/bin/env bash
# Install vllm-supervise with its test dependencies into .venv and run the test suite.
# This is the README's test command; .ci/run calls it on a clean clone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
# The real vLLM (CPU build) for the real_vllm tests, in its own environment outside this
# one; reused when present. If it cannot be installed here, those tests skip with the
# reason it recorded (VLLM_SUPERVISE_SKIP_REAL=1 skips the install on purpose).
if [ "${VLLM_SUPERVISE_SKIP_REAL:-0}" != 1 ]; then
  bash scripts/prepare_real_vllm.sh || echo "scripts/test.sh: real vLLM not prepared" >&2
fi
# The real systemd (nspawn) and dockerd of the deploy_real tests: packages, and a rootfs
# cached under ~/.cache. Where that cannot be done (not root, no apt), those tests skip with
# the reason it recorded (VLLM_SUPERVISE_SKIP_DEPLOY=1 skips the preparation on purpose).
if [ "${VLLM_SUPERVISE_SKIP_DEPLOY:-0}" != 1 ]; then
  bash scripts/prepare_deploy_real.sh || echo "scripts/test.sh: deploy_real systems not prepared" >&2
fi
# A real Prometheus (Debian's package: the server and promtool) for the metrics tests; where
# it cannot be installed, they skip with the reason it recorded
# (VLLM_SUPERVISE_SKIP_PROMETHEUS=1 skips the install on purpose).
if [ "${VLLM_SUPERVISE_SKIP_PROMETHEUS:-0}" != 1 ]; then
  bash scripts/prepare_prometheus.sh || echo "scripts/test.sh: prometheus not prepared" >&2
fi
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "scripts/test.sh: pytest collected no test: that is a failure, not a pass" >&2
  exit 1
fi
exit "$rc"
