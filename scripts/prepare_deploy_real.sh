#!/usr/bin/env bash
# Prepare the real systems for the `deploy_real` tests (tests/deploy_real): a real systemd
# as PID 1 of systemd-nspawn, and a real Docker daemon started privately by the tests.
#
#   1. Debian packages, as root: systemd-container (pinned to the host's systemd version,
#      so that nothing else is upgraded), debootstrap, docker.io (dockerd 20.10). Nothing is
#      started: the package scripts find no systemd running as PID 1.
#   2. A Debian bookworm rootfs (debootstrap --variant=minbase, + systemd, python3,
#      python3-venv, procps), with a virtual environment /opt/vs holding vllm-supervise's
#      dependencies (no network is needed inside later) and /opt/vs/bin/vllm, a stand-in
#      for vLLM's console script that runs the built-in simulated vLLM. The tests boot it
#      with nspawn --volatile=overlay (it is never written to) and `docker import` it as the
#      base image; vllm-supervise itself is built from the working tree by the tests.
#
#   VLLM_SUPERVISE_DEPLOY_HOME (default ~/.cache/vllm-supervise/deploy-real)
#     rootfs/   the prepared tree        READY   written last, the tests look for it
#     FAILED    why it could not be prepared here; the tests skip with that reason
# Exit 0 when ready; non-zero (and FAILED) when it cannot work here.
set -euo pipefail
HOME_DIR=${VLLM_SUPERVISE_DEPLOY_HOME:-$HOME/.cache/vllm-supervise/deploy-real}
STAMP="bookworm-minbase-v1"
mkdir -p "$HOME_DIR"
rm -f "$HOME_DIR/FAILED"
log="$HOME_DIR/prepare.log"
: > "$log"
fail() { echo "$*" > "$HOME_DIR/FAILED"; echo "prepare_deploy_real: $*" >&2; exit 1; }
trap 'rc=$?; [ $rc -eq 0 ] || [ -f "$HOME_DIR/FAILED" ] || fail "exit $rc at line $LINENO: $(tail -n 3 "$log" | tr "\n" " ")"' EXIT
[ "$(id -u)" = 0 ] || fail "needs root (systemd-nspawn, dockerd, debootstrap)"
t0=$(date +%s)

# 1. The packages.
need=()
command -v systemd-nspawn >/dev/null || need+=("systemd-container=$(dpkg-query -W -f='${Version}' systemd)")
command -v debootstrap >/dev/null || need+=(debootstrap)
[ -x /usr/sbin/dockerd ] && [ -x /usr/bin/docker ] || need+=(docker.io)
if [ ${#need[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || fail "no apt-get to install ${need[*]}"
  apt-get update -q >>"$log" 2>&1 || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" \
    >>"$log" 2>&1 || fail "apt-get install ${need[*]} failed: $(tail -n 2 "$log" | tr "\n" " ")"
fi

# 2. The rootfs (debootstrap), reused when its stamp names this recipe; then /opt/vs with
# vllm-supervise's dependencies as pyproject.toml lists them, redone when that list changes.
here=$(cd "$(dirname "$0")/.." && pwd)
deps=$(python3 -c 'import tomllib,sys; print(" ".join(tomllib.load(open(sys.argv[1],"rb"))["project"]["dependencies"]))' "$here/pyproject.toml")
root="$HOME_DIR/rootfs"
if [ -f "$HOME_DIR/READY" ] && [ "$(cat "$HOME_DIR/READY")" = "$STAMP $deps" ] && [ -x "$root/opt/vs/bin/vllm" ]; then
  echo "deploy_real systems ready in $HOME_DIR"
  exit 0
fi
rm -f "$HOME_DIR/READY"
if [ "$(cat "$root/.vs-base" 2>/dev/null)" != "$STAMP" ]; then
  work="$HOME_DIR/rootfs.new"
  rm -rf "$work"
  mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,python3,python3-venv,procps \
    bookworm "$work" "${mirror:-http://deb.debian.org/debian}" >>"$log" 2>&1 \
    || fail "debootstrap failed: $(tail -n 2 "$log" | tr "\n" " ")"
  # A machine id, so that journald keeps a journal; no getty on the console.
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot "$work" systemd-machine-id-setup >>"$log" 2>&1
  rm -f "$work/etc/systemd/system/getty.target.wants/"* 2>/dev/null || true
  echo "$STAMP" > "$work/.vs-base"
  rm -rf "$root"
  mv "$work" "$root"
fi
# The dependencies, downloaded as wheels by this machine's pip (its index and certificate
# settings) for Python 3.11, Debian 12's, and installed offline into /opt/vs inside the tree
# (the tests need no network inside).
wheels="$root/tmp/wheels"
rm -rf "$wheels" "$root/opt/vs"
# shellcheck disable=SC2086 # $deps is a list of requirement specifiers
python3 -m pip download -q --disable-pip-version-check -d "$wheels" --only-binary=:all: \
  --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 \
  --platform manylinux1_x86_64 --platform any $deps >>"$log" 2>&1 \
  || fail "pip download of the dependencies failed: $(tail -n 2 "$log" | tr "\n" " ")"
# shellcheck disable=SC2086 # each specifier one argument, quoted again inside ("$@")
env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot "$root" sh -c \
  'python3 -m venv /opt/vs && /opt/vs/bin/pip install -q --disable-pip-version-check --no-index --find-links /tmp/wheels "$@"' \
  sh $deps >>"$log" 2>&1 \
  || fail "pip install inside the rootfs failed: $(tail -n 2 "$log" | tr "\n" " ")"
rm -rf "$wheels"
cat > "$root/opt/vs/bin/vllm" <<'STANDIN'
#!/opt/vs/bin/python
# Stands in for vLLM's console script (from vllm.entrypoints.cli.main import main): the
# simulated vLLM built into vllm-supervise, installed into this environment by the tests.
import sys
from vllm_supervisor.sim.server import main
sys.exit(main())
STANDIN
chmod 755 "$root/opt/vs/bin/vllm"
echo "$STAMP $deps" > "$HOME_DIR/READY"
echo "deploy_real systems prepared in $HOME_DIR in $(( $(date +%s) - t0 )) s"
