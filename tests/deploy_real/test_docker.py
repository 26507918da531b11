"""The image built with the Dockerfile of docs/container.md, and the line exactly as
`print-unit docker` prints it (minus `--gpus all`, which needs the NVIDIA runtime), run by a
real dockerd 20.10. What a test changes is an image derived with ENV lines (the simulated
vLLM's knobs), named with print-unit's own --image. Every container is removed."""

from __future__ import annotations

import re
import shlex
import subprocess
import time

import pytest

from tests.deploy_real import systems
from tests.helpers import REPO, cli, wait_until

REASON = systems.skip_reason()
pytestmark = [pytest.mark.deploy_real, pytest.mark.timeout(240),
              pytest.mark.skipif(REASON is not None, reason=REASON or "")]
PORT = 8000
SIM = {"FAKE_VLLM_STARTUP_S": "0.5", "VLLM_SUPERVISE_GPU_PROBE": "sim:/var/lib/simgpu:1",
       "FAKE_VLLM_SIM_GPU_DIR": "/var/lib/simgpu", "FAKE_VLLM_VRAM_MIB": "3000"}


def docs_dockerfile() -> str:
    """The Dockerfile as docs/container.md shows it."""
    text = (REPO / "docs/container.md").read_text()
    return re.search(r"```dockerfile\n(.*?)```", text, re.DOTALL).group(1)


@pytest.fixture(scope="module")
def image(dockerd, wheel, deploy_dir):
    """vllm-supervised:test, built the way the docs say, on the imported rootfs."""
    t0 = time.monotonic()
    tar = subprocess.Popen(["tar", "-C", str(systems.ROOTFS), "-c", "."],
                           stdout=subprocess.PIPE)
    dockerd.docker("import", "-c", f"ENV PATH={systems.VENV}/bin:/usr/local/sbin:"
                   "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "-", "vstest-base:1",
                   input=tar.stdout.read())
    assert tar.wait() == 0
    ctx = deploy_dir / "image"
    (ctx / "dist").mkdir(parents=True)
    (ctx / "dist" / wheel.name).write_bytes(wheel.read_bytes())
    (ctx / "Dockerfile").write_text(docs_dockerfile())
    dockerd.docker("build", "-q", "--build-arg", "BASE=vstest-base:1", "-t",
                   "vllm-supervised:test", str(ctx), timeout=300)
    print(f"\nbase image imported and image built in {time.monotonic() - t0:.2f} s")
    return "vllm-supervised:test"


def variant(dockerd, deploy_dir, base: str, tag: str, env: dict[str, str],
            extra: str = "") -> str:
    """An image derived from BASE with ENV lines (and EXTRA Dockerfile lines)."""
    ctx = deploy_dir / f"variant-{tag}"
    ctx.mkdir(exist_ok=True)
    lines = [f"FROM {base}", "RUN mkdir -p /var/lib/simgpu"]
    lines += [f"ENV {k}={shlex.quote(v)}" for k, v in env.items()] + ([extra] if extra else [])
    (ctx / "Dockerfile").write_text("\n".join(lines) + "\n")
    dockerd.docker("build", "-q", "-t", f"vstest-{tag}:1", str(ctx))
    return f"vstest-{tag}:1"


class Container:
    """`print-unit docker`'s line, run attached by the real docker client."""

    def __init__(self, dockerd, image: str, *serve_args: str):
        printed = cli("print-unit", "--image", image, "docker", *serve_args, "fake/model",
                      "--", "--port", str(PORT))
        assert printed.returncode == 0, printed.stderr
        argv = shlex.split(printed.stdout)
        assert argv[:4] == ["docker", "run", "--gpus", "all"], argv
        self.line = argv
        self.d = dockerd
        self.client = subprocess.Popen(
            [systems.DOCKER, "-H", f"unix://{dockerd.sock}", "run", *argv[4:]],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.id = wait_until(self._created, 30, "the container")

    def _created(self) -> str | None:
        assert self.client.poll() is None or self.d.docker("ps", "-aq").stdout, \
            self.client.stdout.read().decode(errors="replace")
        ids = self.d.docker("ps", "-aq").stdout.decode().split()
        return ids[0] if len(ids) == 1 else None

    def exec(self, *argv: str) -> str:
        return self.d.docker("exec", self.id, *argv).stdout.decode()

    def health(self) -> int | None:
        out = self.d.in_netns("python3", "-c", "import urllib.request as u\ntry: print(u."
                              f"urlopen('http://127.0.0.1:{PORT}/health', timeout=2).status)\n"
                              "except Exception: print(0)").stdout.strip()
        return int(out) if out.isdigit() and out != "0" else None

    def wait(self) -> int:
        return int(self.d.docker("wait", self.id, timeout=180).stdout.decode().strip())

    def logs(self) -> str:
        res = self.d.docker("logs", self.id)
        return (res.stdout + res.stderr).decode(errors="replace")

    def remove(self) -> None:
        self.d.docker("rm", "-f", self.id, check=False)
        self.client.wait(30)
        self.client.stdout.close()


@pytest.fixture
def run(dockerd):
    made: list[Container] = []

    def start(image: str, *serve_args: str) -> Container:
        made.append(Container(dockerd, image, *serve_args))
        return made[-1]

    yield start
    for c in made:
        c.remove()
    assert dockerd.docker("ps", "-aq").stdout == b""


def test_docker_stop_is_clean_pid_1_is_the_supervisor_and_orphans_are_reaped(
        dockerd, image, deploy_dir, run):
    img = variant(dockerd, deploy_dir, image, "orphans",
                  SIM | {"FAKE_VLLM_ORPHANS": "20", "FAKE_VLLM_ORPHAN_LIFE_S": "0.3"})
    c = run(img, "--grace", "5")
    wait_until(lambda: c.health() == 200, 30, "/health through the published port")
    assert c.exec("cat", "/proc/1/cmdline").split("\0")[1:3] == [
        "/opt/vs/bin/vllm-supervise", "serve"]
    # 20 orphans were made before /health answered; PID 1 reaps them. `docker top` cannot
    # show zombies: ps inside can.
    zombies = lambda: [ln for ln in c.exec("ps", "-eo", "stat=,pid=,args=").splitlines()
                       if ln.strip().startswith("Z")]
    wait_until(lambda: not zombies(), 30, lambda: f"no zombies: {zombies()}")
    t0 = time.monotonic()
    dockerd.docker("stop", c.id, timeout=120)
    stop_s = time.monotonic() - t0
    assert c.wait() == 0
    log = c.logs()
    assert "SIGTERM from a process outside this PID namespace (docker stop" in log, log[-2000:]
    assert "every process of the tree is gone and reaped" in log
    assert "stop took" in log and "(no SIGKILL needed)" in log
    assert re.search(r"VRAM +released", log), log[-2000:]
    print(f"docker stop took {stop_s:.2f} s")


def test_a_term_ignoring_tree_is_sigkilled_by_us_within_the_stop_timeout(
        dockerd, image, deploy_dir, run):
    img = variant(dockerd, deploy_dir, image, "stubborn",
                  SIM | {"FAKE_VLLM_MISBEHAVE": "engine-ignores-term,worker-hangs-shutdown"})
    c = run(img, "--grace", "3")
    budget = int(next(a for a in c.line if a.startswith("--stop-timeout=")).split("=")[1])
    wait_until(lambda: c.health() == 200, 30, "/health")
    t0 = time.monotonic()
    dockerd.docker("stop", c.id, timeout=120)
    stop_s = time.monotonic() - t0
    assert c.wait() == 4
    log = c.logs()
    assert "grace of 3 s is over: SIGKILL" in log and "exit code   4" in log, log[-2000:]
    assert 3 <= stop_s < budget, (stop_s, budget)
    print(f"stubborn tree: docker stop took {stop_s:.2f} s (--stop-timeout={budget})")


def test_docker_stop_t_shorter_than_our_budget_ends_in_137(dockerd, image, deploy_dir, run):
    # Docker SIGKILLs PID 1 after -t; the kernel then kills the whole PID namespace: no
    # report, no GPU check. Hence print-unit's --stop-timeout.
    img = variant(dockerd, deploy_dir, image, "stubborn",
                  SIM | {"FAKE_VLLM_MISBEHAVE": "engine-ignores-term,worker-hangs-shutdown"})
    c = run(img, "--grace", "5")
    wait_until(lambda: c.health() == 200, 30, "/health")
    dockerd.docker("stop", "-t", "1", c.id, timeout=120)
    assert c.wait() == 137
    assert "stop report" not in c.logs()


@pytest.mark.parametrize("case,code", [("exits-9", 9), ("dies-starting", 3),
                                       ("no-vllm", 127), ("engine-killed", 7)])
def test_exit_codes_through_docker_wait(dockerd, image, deploy_dir, run, case, code):
    env = {"exits-9": {"FAKE_VLLM_EXIT_AFTER_S": "1", "FAKE_VLLM_EXIT_CODE": "9"},
           "dies-starting": {"FAKE_VLLM_MISBEHAVE": "die-during-startup"}}.get(case, {})
    img = variant(dockerd, deploy_dir, image, case, SIM | env)
    args = ("--vllm-bin", "/nonexistent/vllm") if case == "no-vllm" else ()
    c = run(img, "--grace", "5", *args)
    if case == "engine-killed":
        wait_until(lambda: c.health() == 200, 30, "/health")
        engine = [ln.split()[0] for ln in c.exec("ps", "-eo", "pid=,args=").splitlines()
                  if ln.split()[1:2] == ["VLLM::EngineCore"]]
        assert len(engine) == 1, engine
        c.exec("kill", "-9", engine[0])
    assert c.wait() == code, c.logs()[-2000:]


def test_the_line_makes_the_supervisor_pid_1_even_when_the_image_starts_vllm(
        dockerd, image, deploy_dir, run):
    # vLLM's images have an ENTRYPOINT that starts vLLM: print-unit's --entrypoint wins.
    img = variant(dockerd, deploy_dir, image, "vllm-entrypoint", SIM,
                  extra='ENTRYPOINT ["/opt/vs/bin/vllm", "serve"]')
    c = run(img, "--grace", "5")
    wait_until(lambda: c.health() == 200, 30, "/health")
    assert "vllm-supervise" in c.exec("cat", "/proc/1/cmdline")
    dockerd.docker("stop", c.id)
    assert c.wait() == 0


def test_negative_control_the_old_line_without_entrypoint_breaks_on_the_docs_image(
        dockerd, image):
    # The line as print-unit printed it before: `IMAGE vllm-supervise serve ...` after an
    # ENTRYPOINT that already says vllm-supervise. The container does not serve.
    res = dockerd.docker("run", "--rm", image, "vllm-supervise", "serve", "--grace", "5",
                         "fake/model", "--", "--port", str(PORT), check=False, timeout=60)
    assert res.returncode == 2, res
    assert "No such command 'vllm-supervise'" in res.stderr.decode(), res.stderr


def test_print_unit_refuses_what_serve_refuses():
    for args in (("--bogus-option", "m"), ("--image", "x", "m"), ("--grace", "-1", "m")):
        res = cli("print-unit", "docker", *args)
        assert res.returncode == 2 and res.stdout == "", (args, res)
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
