"""Tests marked private_pid_namespace signal processes they did not start (`cleanup --yes`
stops every unsupervised vLLM-like tree of this user it can see). Each runs in a PID
namespace of its own: a second pytest, with a small reaping init as PID 1, runs the one
test there, where the only processes are the ones it starts. When the init dies, the
kernel kills whatever is left in the namespace."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.helpers import REPO

INSIDE = "VLLM_SUPERVISE_TEST_PIDNS"  # set for the inner pytest, which runs the body
# PID 1 of the namespace: starts the command, reaps every process that ends up with it, and
# exits with the command's status.
INIT = """import os, sys
child = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ)
while True:
    pid, status = os.wait()
    if pid == child:
        sys.exit(os.waitstatus_to_exitcode(status))
"""


def _inside() -> bool:
    return os.environ.get(INSIDE) == "1" and os.getppid() == 1


@functools.cache
def _unshare() -> tuple[list[str], str | None]:
    """The unshare command line, or why there is none."""
    if shutil.which("unshare") is None:
        return [], "unshare (util-linux) is not installed"
    # Without root, a user namespace in which we are root makes the PID namespace possible.
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    cmd = ["unshare", *user, "--pid", "--fork", "--mount-proc", "--kill-child"]
    res = subprocess.run([*cmd, "true"], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        return [], f"cannot make a PID namespace: {res.stderr.strip()[:200]}"
    return cmd, None


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Outside: run this one test in its own PID namespace instead of here."""
    if pyfuncitem.get_closest_marker("private_pid_namespace") is None or _inside():
        return None
    unshare, why = _unshare()
    if why:
        pytest.skip(f"needs a PID namespace of its own: {why}")
    with tempfile.TemporaryDirectory(prefix="vllm-supervise-pidns-") as basetemp:
        cmd = [*unshare, sys.executable, "-c", INIT, sys.executable, "-m", "pytest", "-q",
               "-p", "no:cacheprovider", f"--basetemp={basetemp}/inner", pyfuncitem.nodeid]
        res = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, **{INSIDE: "1"}),
                             stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             check=False)
    lines = (res.stdout + res.stderr).strip().splitlines() or [""]
    if res.returncode != 0:
        pytest.fail(f"in its own PID namespace (exit {res.returncode}):\n"
                    + "\n".join(lines[-120:]), pytrace=False)
    if "1 passed" not in lines[-1]:  # skipped there: say why here
        why = [line for line in lines if line.startswith("SKIPPED")] or lines[-1:]
        pytest.skip(f"in its own PID namespace: {why[0]}")
    return True
