"""The simulated vLLM's CUDA paths (FAKE_VLLM_CUDA_MIB, FAKE_VLLM_NCCL, rank-dies-in-collective)
on a machine without a GPU: a stand-in `torch` package on PYTHONPATH records who imports it
and what is asked of it. The same paths run against real CUDA in tests/gpu/test_gpu.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.helpers import REPO, alive, survivors, wait_until
from vllm_supervisor.sim.cuda import DEAD_PEER_ENTER, DEAD_PEER_RETURNED

pytestmark = pytest.mark.timeout(120)

FAKE_TORCH = '''
"""Stand-in torch: records calls in $FAKE_TORCH_LOG/<pid>.jsonl; no CUDA anywhere."""
import json, os, time

uint8, float32 = "uint8", "float32"
_state = {"dev": 0, "dead_peer": False}


def _note(what, **kw):
    with open(os.path.join(os.environ["FAKE_TORCH_LOG"], f"{os.getpid()}.jsonl"), "a") as f:
        f.write(json.dumps({"what": what, "pid": os.getpid(), "t": time.time(), **kw}) + "\\n")


_note("import", cmdline=open("/proc/self/cmdline").read().replace("\\0", " ").strip())


class Tensor:
    def __init__(self, value=0.0):
        self.value = value

    def item(self):
        return self.value


def empty(n, dtype=None, device=None):
    time.sleep(float(os.environ.get("FAKE_TORCH_EMPTY_S", "0")))
    _note("empty", n=n, dtype=dtype, device=device)
    return Tensor()


def ones(n, device=None):
    return Tensor(1.0)


class _Props:
    def __init__(self, d):
        self.uuid = f"fake-uuid-{d}"


class cuda:
    @staticmethod
    def is_available():
        return True

    @staticmethod
    def device_count():
        return int(os.environ.get("FAKE_TORCH_DEVICES", "2"))

    @staticmethod
    def set_device(d):
        _state["dev"] = d

    @staticmethod
    def current_device():
        return _state["dev"]

    @staticmethod
    def get_device_properties(d):
        return _Props(d)

    @staticmethod
    def mem_get_info(d=None):
        _note("mem_get_info", device=d)
        free = float(os.environ.get("FAKE_TORCH_FREE_MIB", "80000"))
        return int(free * 2**20), 81559 * 2**20

    @staticmethod
    def synchronize(device=None):
        if _state["dead_peer"]:
            _note("stuck")
            while True:  # a kernel waiting for a dead peer
                time.sleep(3600)
'''

FAKE_DIST = '''
"""Stand-in torch.distributed: a real TCP rendezvous on the init_method port."""
import os, socket, time
import torch

_group = {}


def init_process_group(backend, init_method, rank, world_size, timeout=None):
    port = int(init_method.rsplit(":", 1)[1])
    s = socket.socket()
    if rank == 0:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(16)
    else:
        deadline = time.monotonic() + 30
        while True:
            try:
                s.connect(("127.0.0.1", port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
    _group.update(sock=s, world_size=world_size, calls=0)
    env = {k: os.environ.get(k) for k in ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_NVLS_ENABLE",
                                          "TORCH_NCCL_ENABLE_MONITORING", "NCCL_SOCKET_IFNAME")}
    torch._note("init", backend=backend, init_method=init_method, rank=rank,
                world_size=world_size, timeout_s=timeout.total_seconds(), env=env)


def all_reduce(t):
    _group["calls"] += 1
    torch._note("all_reduce", n=_group["calls"])
    if _group["calls"] == 1:
        t.value = float(_group["world_size"])
    else:
        torch._state["dead_peer"] = True
'''


@pytest.fixture
def fake_torch(tmp_path):
    """(env additions putting the stand-in torch on PYTHONPATH, a reader of its records)."""
    pkg = tmp_path / "faketorch" / "torch"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_TORCH)
    (pkg / "distributed.py").write_text(FAKE_DIST)
    logdir = tmp_path / "torchlog"
    logdir.mkdir()
    env = {"PYTHONPATH": f"{pkg.parent}{os.pathsep}{REPO}", "FAKE_TORCH_LOG": str(logdir)}

    def records(what: str | None = None) -> list[dict]:
        out = []
        for path in sorted(logdir.glob("*.jsonl")):
            out += [json.loads(line) for line in path.read_text().splitlines() if line]
        return [r for r in out if what is None or r["what"] == what]

    return env, records


@pytest.mark.parametrize(("env", "tp", "text"), [
    ({"FAKE_VLLM_NCCL": "1", "FAKE_VLLM_CUDA_MIB": "64"}, 1, "needs --tensor-parallel-size >= 2"),
    ({"FAKE_VLLM_NCCL": "1"}, 2, "FAKE_VLLM_CUDA_MIB > 0"),
    ({"FAKE_VLLM_CUDA_MIB": "64", "FAKE_VLLM_MISBEHAVE": "rank-dies-in-collective"}, 2,
     "needs FAKE_VLLM_NCCL=1"),
    ({"FAKE_VLLM_CUDA_MIB": "-1"}, 1, "must be >= 0"),
])
def test_bad_cuda_knobs_exit_2(env, tp, text):
    full = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_VLLM_")}
    full.update(PYTHONPATH=str(REPO), **env)
    res = subprocess.run([sys.executable, "-m", "vllm_supervisor.sim", "serve", "m",
                          "-tp", str(tp), "--port", "0"], env=full, capture_output=True,
                         text=True, timeout=30, check=False)
    assert res.returncode == 2 and text in res.stderr, res.stderr


def test_only_workers_import_torch_and_memory_is_held_before_ready(supervise, fake_torch,
                                                                   tmp_path):
    env, records = fake_torch
    out = tmp_path / "stdout.txt"
    with open(out, "wb") as f:
        run = supervise("--grace", "5", vllm_args=("-tp", "2"), stdout=f,
                        env={**env, "FAKE_VLLM_CUDA_MIB": "64", "FAKE_VLLM_NCCL": "1",
                             "FAKE_TORCH_EMPTY_S": "0.5"})
        run.wait_ready()
        seen_at_ready = records("empty")
        pids = run.tree_pids()
        workers = pids["workers"]
        assert {r["pid"] for r in records("import")} == set(workers)  # never API or engine
        assert sorted((r["pid"], r["n"], r["device"]) for r in seen_at_ready) == sorted(
            (w, 64 * 2**20, f"cuda:{rank}") for rank, w in enumerate(workers))
        inits = sorted(records("init"), key=lambda r: r["rank"])
        assert [(r["rank"], r["world_size"], r["backend"]) for r in inits] == [
            (0, 2, "nccl"), (1, 2, "nccl")]
        assert len({r["init_method"] for r in inits}) == 1
        assert inits[0]["init_method"].startswith("tcp://127.0.0.1:")
        assert inits[0]["timeout_s"] >= 3600
        assert inits[0]["env"] == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0",
                                   "NCCL_NVLS_ENABLE": "0", "TORCH_NCCL_ENABLE_MONITORING": "0",
                                   "NCCL_SOCKET_IFNAME": "lo"}
        run.signal(signal.SIGTERM)
        assert run.finish() == 0
    text = out.read_text()
    for rank, w in enumerate(workers):
        assert (f"(Worker_TP{rank} pid={w}) INFO" in text
                and f"allocated 64 MiB on cuda:{rank} (GPU-fake-uuid-{rank})" in text), text
    assert text.count("all_reduce ok") == 2


def test_device_is_rank_modulo_visible_count(supervise, fake_torch):
    env, records = fake_torch
    run = supervise("--grace", "5", vllm_args=("-tp", "3"),
                    env={**env, "FAKE_VLLM_CUDA_MIB": "8", "FAKE_TORCH_DEVICES": "2"})
    run.wait_ready()
    workers = run.tree_pids()["workers"]
    got = {r["pid"]: r["device"] for r in records("empty")}
    assert got == {workers[0]: "cuda:0", workers[1]: "cuda:1", workers[2]: "cuda:0"}
    assert not records("init")  # no NCCL unless asked
    run.signal(signal.SIGTERM)
    assert run.finish() == 0


def test_rank_dies_in_collective_needs_sigkill(supervise, fake_torch):
    env, records = fake_torch
    run = supervise("--grace", "3", vllm_args=("-tp", "2"),
                    env={**env, "FAKE_VLLM_CUDA_MIB": "64", "FAKE_VLLM_NCCL": "1",
                         "FAKE_VLLM_MISBEHAVE": "rank-dies-in-collective",
                         "FAKE_VLLM_COLLECTIVE_AFTER_S": "0.3"})
    run.wait_ready()
    rank0, rank1 = run.tree_pids()["workers"]
    assert not survivors([rank1], 10), "rank 1 did not die"
    run.wait_for(DEAD_PEER_ENTER)
    # Stuck for good from here on: only a signal gets rank 0 out of this wait.
    wait_until(lambda: any(r["pid"] == rank0 for r in records("stuck")), 10, "rank 0 stuck")
    assert alive(rank0)
    run.signal(signal.SIGTERM)
    assert run.finish() == 4
    rep = run.report()
    assert any(s["signal"] == "SIGKILL" and s["direction"] == "sent" for s in rep["signals"])
    assert DEAD_PEER_RETURNED not in run.stderr()
    assert not alive(rank0)


def test_worker_hangs_shutdown_while_holding_cuda_memory(supervise, fake_torch):
    env, records = fake_torch
    run = supervise("--grace", "1", vllm_args=("-tp", "2"),
                    env={**env, "FAKE_VLLM_CUDA_MIB": "64",
                         "FAKE_VLLM_MISBEHAVE": "worker-setsid,worker-hangs-shutdown"})
    run.wait_ready()
    assert len(records("empty")) == 2
    run.signal(signal.SIGTERM)
    assert run.finish() == 4


def test_allocation_failure_fails_startup(supervise, fake_torch):
    env, _ = fake_torch
    run = supervise("--grace", "2", env={**env, "FAKE_VLLM_CUDA_MIB": "64",
                                         "FAKE_TORCH_DEVICES": "0"})
    assert run.finish() == 3
    assert "torch sees no CUDA device" in run.stderr()


@pytest.mark.parametrize("free_mib", [32, 128])
def test_check_free_cuda(sim, fake_torch, free_mib):
    """FAKE_VLLM_CHECK_FREE=1 with FAKE_VLLM_CUDA_MIB: the worker asks torch for its device's
    free memory before allocating, and fails to start when 100 MiB do not fit."""
    env, records = fake_torch
    s = sim(env={**env, "FAKE_VLLM_CHECK_FREE": "1", "FAKE_VLLM_CUDA_MIB": "100",
                 "FAKE_TORCH_FREE_MIB": str(free_mib)})
    if free_mib < 100:
        assert s.proc.wait(10) == 1
        assert ("ValueError: Free memory on device (0.03/79.65 GiB) on startup is less than "
                "desired GPU memory utilization (0.10 GiB).") in s.err(), s.err()
        assert "Application startup complete." not in s.out()
        assert [r["device"] for r in records("mem_get_info")] == [0]
        assert not records("empty")
        return
    s.wait_ready()
    assert "Free memory on device" not in s.err()
    (checked,), (allocated,) = records("mem_get_info"), records("empty")
    assert checked["device"] == 0 and checked["t"] <= allocated["t"]
    os.kill(s.pid, signal.SIGTERM)
    assert s.proc.wait(5) == 0
