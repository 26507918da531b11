"""The real systems of the deploy_real layer, each started privately and torn down
completely: systemd 252 as PID 1 of systemd-nspawn, and a Docker daemon in its own network
and mount namespaces. scripts/prepare_deploy_real.sh installs the packages and builds the
rootfs they share (under ~/.cache); the tests build vllm-supervise's wheel from this tree.

Everything here acts only on what it created: the nspawn process and the PID namespace it
made, the cgroups it made (named after this test run), the dockerd it started and the
processes inside that dockerd's private mount namespace, and its own temporary folder."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.helpers import REPO, wait_until

HOME = Path(os.environ.get("VLLM_SUPERVISE_DEPLOY_HOME",
                           Path.home() / ".cache/vllm-supervise/deploy-real"))
ROOTFS = HOME / "rootfs"
DOCKER = "/usr/bin/docker"  # Debian's client, the daemon's own version
VENV = "/opt/vs"  # in the rootfs: the dependencies, the simulated `vllm`, and ours
CGROUP_ROOT = Path("/sys/fs/cgroup")


def skip_reason() -> str | None:
    """Why this layer cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, dockerd)"
    for tool in ("systemd-nspawn", "nsenter", "unshare", "/usr/sbin/dockerd", DOCKER):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: run scripts/prepare_deploy_real.sh"
    if not (HOME / "READY").exists():
        failed = HOME / "FAILED"
        if failed.exists():
            return f"deploy_real systems could not be prepared: {failed.read_text().strip()}"
        return f"deploy_real systems not prepared in {HOME}: run scripts/prepare_deploy_real.sh"
    return None


def build_wheel(dest: Path) -> Path:
    """vllm-supervise's wheel, built from a copy of this tree (the tree stays untouched)."""
    src = dest / "src"
    for part in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / part, src / part if src.exists() else _mk(src) / part)
    shutil.copytree(REPO / "vllm_supervisor", src / "vllm_supervisor",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = dest / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--disable-pip-version-check", "-w", str(out), str(src)],
                   check=True, capture_output=True, timeout=300)
    shutil.rmtree(src)
    return next(out.glob("vllm_supervise-*.whl"))


def _mk(d: Path) -> Path:
    d.mkdir(parents=True)
    return d


# -- what a test run may leave behind ------------------------------------------------
def host_snapshot() -> dict[str, set]:
    """What the layer must leave as it found it: mounts, network links, cgroups, and the
    files dockerd creates whatever its options say."""
    with open("/proc/self/mountinfo") as f:
        mounts = {" ".join(line.split()[3:5]) for line in f}
    cgroups = set()
    for hier in CGROUP_ROOT.iterdir() if CGROUP_ROOT.is_dir() else ():
        if hier.is_dir() and not hier.is_symlink():
            cgroups |= {str(p) for p in hier.iterdir() if p.is_dir()}
    files = {p for p in ("/etc/docker/key.json", "/var/run/docker", "/run/containerd",
                         "/run/xtables.lock", "/var/lib/docker") if os.path.lexists(p)}
    return {"mounts": mounts, "links": set(os.listdir("/sys/class/net")),
            "cgroups": cgroups, "files": files}


def leftovers(before: dict[str, set], after: dict[str, set]) -> dict[str, list]:
    """What AFTER has that BEFORE had not."""
    return {k: sorted(after[k] - before[k]) for k in before if after[k] - before[k]}


def _make_cgroups(name: str) -> list[Path]:
    """A cgroup NAME in the named systemd hierarchy and in cgroup2 (where mounted), for
    a machine's processes to live under (nspawn --keep-unit uses the caller's cgroup)."""
    made = []
    for hier in ("systemd", "unified"):
        base = CGROUP_ROOT / hier
        if base.is_dir() and (base / "cgroup.procs").exists():
            (base / name).mkdir()
            made.append(base / name)
    return made


def remove_cgroups(top: Path) -> None:
    """Remove the cgroup TOP and everything under it, deepest first (only empty cgroups
    can go: a process still inside makes this raise)."""
    if not top.is_dir():
        return
    for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        d.rmdir()
    top.rmdir()


def in_namespace_of(pid: int, kind: str) -> list[int]:
    """Every process in PID's namespace of KIND ("pid", "mnt"): the namespaces a system
    of this layer was started in are ours, and so is whatever runs in them."""
    mine = os.readlink(f"/proc/{pid}/ns/{kind}")
    found = []
    for p in psutil.pids():
        try:
            if os.readlink(f"/proc/{p}/ns/{kind}") == mine:
                found.append(p)
        except OSError:
            continue
    return found


def _kill_and_reap(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    psutil.wait_procs([p for p in map(_proc, pids) if p], timeout=10)


def _proc(pid: int):
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


# -- systemd in nspawn -----------------------------------------------------------------
class Machine:
    """systemd as PID 1 of a private nspawn container: volatile overlay over the cached
    rootfs, its own network namespace (loopback only), nothing registered with the host.
    Commands go in with nsenter; WORKDIR is bound at /mnt/test."""

    def __init__(self, workdir: Path, wheel: Path):
        self.workdir = workdir
        self.name = f"vstest{os.getpid()}"
        self.cgroup_name = f"vllm-supervise-test-{os.getpid()}"
        self.cgroups: list[Path] = []
        self.proc: subprocess.Popen | None = None
        self.leader = 0
        self.wheel = wheel
        self.boot_s = 0.0

    def boot(self) -> None:
        self.cgroups = _make_cgroups(self.cgroup_name)
        # A shell moves itself into our cgroups and becomes nspawn.
        enter = "".join(f"echo $$ > {c / 'cgroup.procs'}; " for c in self.cgroups)
        shutil.copy2(self.wheel, self.workdir / self.wheel.name)
        t0 = time.monotonic()
        with open(self.workdir / "console.log", "wb") as console:
            self.proc = subprocess.Popen(
                ["sh", "-c", enter + 'exec "$0" "$@"', "systemd-nspawn", "--quiet", "--boot",
                 f"--directory={ROOTFS}", "--volatile=overlay", "--private-network",
                 "--register=no", "--keep-unit", f"--machine={self.name}",
                 f"--bind={self.workdir}:/mnt/test", "--console=pipe"],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.leader = wait_until(self._find_leader, 30, "the container's systemd")
        # systemctl answers once systemd's private socket is up ("offline" before
        # /run/systemd/system exists); --wait then waits for the boot to finish.
        def booted():
            state = self.sh("systemctl is-system-running --wait", check=False,
                            timeout=60).stdout.strip()
            return state if state in ("running", "degraded") else None

        wait_until(booted, 60, "systemd to finish booting")
        self.boot_s = time.monotonic() - t0
        self.sh(f"{VENV}/bin/pip install -q --no-deps --no-index --disable-pip-version-check "
                f"/mnt/test/{self.wheel.name}", timeout=120)

    def _find_leader(self) -> int | None:
        assert self.proc.poll() is None, (self.workdir / "console.log").read_text()[-2000:]
        for c in psutil.Process(self.proc.pid).children():
            try:
                if c.name() == "systemd":
                    return c.pid
            except psutil.Error:
                continue
        return None

    def sh(self, script: str, check: bool = True, timeout: float = 60,
           input: str | None = None) -> subprocess.CompletedProcess:
        """SCRIPT run by /bin/sh inside the machine, in a clean environment."""
        res = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "-C", "--",
             "env", "-i", f"PATH={VENV}/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8",
             "/bin/sh", "-c", script],
            input=input, capture_output=True, text=True, timeout=timeout, check=False)
        if check and res.returncode != 0:
            raise AssertionError(f"in the machine: {script!r} exited {res.returncode}: "
                                 f"{res.stdout[-1500:]} {res.stderr[-1500:]}")
        return res

    def pids(self) -> set[int]:
        """Host PIDs of every process in the machine's PID namespace."""
        return set(in_namespace_of(self.leader, "pid"))

    def shutdown(self) -> None:
        """Power off; after 30 s, SIGKILL its PID 1 (which ends the whole namespace) and
        nspawn. Then its cgroups go."""
        if self.proc is None:
            return
        inside = self.pids() if self.proc.poll() is None and self.leader else set()
        if self.proc.poll() is None and self.leader:
            self.sh("systemctl poweroff --no-block", check=False, timeout=20)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                _kill_and_reap([self.leader, self.proc.pid])
                self.proc.wait(10)
        for cg in self.cgroups:
            remove_cgroups(cg)
        left = [p for p in inside | {self.proc.pid} if _proc(p) and _proc(p).status() != "zombie"]
        assert not left, f"the machine's processes outlived it: {left}"


# -- a private dockerd -------------------------------------------------------------------
class Dockerd:
    """dockerd in new network and mount namespaces: its data root, exec root and socket
    in WORKDIR; /run and /etc/docker are private tmpfs there, so that the files dockerd
    makes whatever its options say (/etc/docker/key.json, /var/run/docker, /run/containerd,
    /run/xtables.lock) never reach the host; the containers' cgroups under one parent."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.sock = workdir / "docker.sock"
        self.cgroup_parent = f"vllm-supervise-test-docker-{os.getpid()}"
        self.proc: subprocess.Popen | None = None
        self.pid = 0
        self.start_s = 0.0

    def start(self) -> None:
        script = self.dir / "start.sh"
        script.write_text(
            "set -e\nmount --make-rprivate /\n"
            "mount -t tmpfs -o mode=755 tmpfs /run\n"
            "mount -t tmpfs -o mode=755 tmpfs /etc/docker\n"
            "ip link set lo up\n"
            f"exec /usr/sbin/dockerd --data-root {self.dir}/data --exec-root {self.dir}/exec "
            f"-H unix://{self.sock} --pidfile {self.dir}/docker.pid "
            f"--cgroup-parent /{self.cgroup_parent} --log-level warn\n")
        t0 = time.monotonic()
        with open(self.dir / "dockerd.log", "wb") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--net", "--mount", "sh", str(script)], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: self._answers(), 60, "dockerd to answer")
        self.pid = self.proc.pid  # the shell exec'd dockerd
        self.start_s = time.monotonic() - t0

    def _answers(self) -> bool:
        assert self.proc.poll() is None, (self.dir / "dockerd.log").read_text()[-2000:]
        return self.sock.exists() and self.docker("version", check=False).returncode == 0

    def docker(self, *args: str, check: bool = True, timeout: float = 120,
               input: bytes | None = None) -> subprocess.CompletedProcess:
        res = subprocess.run([DOCKER, "-H", f"unix://{self.sock}", *args], input=input,
                             capture_output=True, timeout=timeout, check=False,
                             env=dict(os.environ, DOCKER_BUILDKIT="0"))
        if check and res.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited {res.returncode}: "
                                 f"{res.stderr.decode(errors='replace')[-1500:]}")
        return res

    def in_netns(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """ARGV run on the host side of dockerd's network namespace (where -p publishes)."""
        return subprocess.run(["nsenter", f"--net=/proc/{self.pid}/ns/net", "--", *argv],
                              capture_output=True, text=True, timeout=timeout, check=False)

    def namespace_pids(self) -> list[int]:
        """Every process in dockerd's private mount namespace (containerd, shims, ...)."""
        return in_namespace_of(self.pid, "mnt")

    def stop(self) -> None:
        """Remove every container, stop dockerd, kill what is left in its namespace, and
        remove the cgroups made under its parent and its folder's contents."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            ids = self.docker("ps", "-aq", check=False).stdout.decode().split()
            if ids:
                self.docker("rm", "-f", *ids, check=False)
            inside = self.namespace_pids()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
            _kill_and_reap([p for p in inside if psutil.pid_exists(p)])
            if self.proc.poll() is None:
                self.proc.wait(10)
            left = [p for p in inside if psutil.pid_exists(p)]
            assert not left, f"dockerd's processes outlived it: {left}"
        for hier in CGROUP_ROOT.iterdir():
            remove_cgroups(hier / self.cgroup_parent)
        shutil.rmtree(self.dir / "data", ignore_errors=False)
