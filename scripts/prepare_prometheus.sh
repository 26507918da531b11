#!/usr/bin/env bash
# Prepare a real Prometheus for the metrics tests (tests/integration/test_metrics_prometheus.py):
# Debian's `prometheus` package (the server and promtool), as root. Nothing is started:
# where systemd runs and no policy-rc.d says otherwise, a temporary one (made here, removed
# here) keeps the package's service from starting; the tests run their own server on a
# loopback port with a private config and storage.
#
#   VLLM_SUPERVISE_PROMETHEUS_HOME (default ~/.cache/vllm-supervise/prometheus)
#     FAILED   why it could not be installed here; the tests skip with that reason
# Exit 0 when prometheus and promtool are on PATH.
set -euo pipefail
HOME_DIR=${VLLM_SUPERVISE_PROMETHEUS_HOME:-$HOME/.cache/vllm-supervise/prometheus}
mkdir -p "$HOME_DIR"
rm -f "$HOME_DIR/FAILED"
log="$HOME_DIR/prepare.log"
: > "$log"
fail() { echo "$*" > "$HOME_DIR/FAILED"; echo "prepare_prometheus: $*" >&2; exit 1; }
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  echo "prometheus ready: $(prometheus --version 2>&1 | head -n1)"
  exit 0
fi
[ "$(id -u)" = 0 ] || fail "needs root to install Debian's prometheus package"
command -v apt-get >/dev/null || fail "no apt-get to install Debian's prometheus package"
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && made_policy=1
fi
trap '[ "$made_policy" = 1 ] && rm -f "$policy"' EXIT
apt-get update -q >>"$log" 2>&1 || true
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus \
  >>"$log" 2>&1 || fail "apt-get install prometheus failed: $(tail -n 2 "$log" | tr "\n" " ")"
command -v promtool >/dev/null || fail "the prometheus package brought no promtool"
echo "prometheus ready: $(prometheus --version 2>&1 | head -n1)"
