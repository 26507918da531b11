"""Real GPUs: the simulated vLLM's workers hold real CUDA memory (FAKE_VLLM_CUDA_MIB) and the
supervisor must see it released through NVML. Every test also reads NVML itself, as an
independent check that each GPU is back within 256 MiB of its baseline.

Needs NVIDIA GPUs, NVML (nvidia-ml-py) and torch with CUDA; skipped with the reason
elsewhere. scripts/gpu_verify.sh runs it on the GPU machine."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.gpu.nvml_view import ALLOC_MIB, Gpus
from tests.helpers import REPO, alive, free_port, http_get, kill_all, survivors, wait_until
from vllm_supervisor.sim.cuda import DEAD_PEER_ENTER, DEAD_PEER_RETURNED

READY_TIMEOUT_S = 240  # each worker imports torch and creates a CUDA context


def _gpu_skip_reason() -> str | None:
    """None when NVML initialises with a GPU and torch.cuda.is_available(); else why not.
    torch is asked in a subprocess, so this test process never touches CUDA."""
    try:
        import pynvml
    except ImportError:
        return "nvidia-ml-py (pynvml) is not installed"
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except Exception as exc:  # noqa: BLE001 - NVMLError, or no libnvidia-ml at all
        return f"NVML does not initialise here ({exc})"
    if count < 1:
        return "NVML sees no GPU"
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    try:
        res = subprocess.run([sys.executable, "-c",
                              "import torch; print(torch.cuda.is_available())"],
                             capture_output=True, text=True, timeout=180, check=False)
    except subprocess.TimeoutExpired:
        return "torch.cuda.is_available() did not answer within 180 s"
    if res.stdout.strip() != "True":
        return f"torch.cuda.is_available() is not True ({res.stderr.strip()[-300:]})"
    return None


_SKIP = _gpu_skip_reason()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_SKIP is not None,
                       reason=f"needs NVIDIA GPUs, NVML and CUDA torch: {_SKIP}"),
]
if importlib.util.find_spec("pytest_timeout") is not None:  # may be missing on a GPU host
    pytestmark.append(pytest.mark.timeout(300))


def _start(supervise, *sup_args: str, tp: int = 1, env: dict | None = None, **kw):
    """The supervisor with the NVML probe over the simulated vLLM holding real memory."""
    e = {"FAKE_VLLM_CUDA_MIB": str(ALLOC_MIB), "FAKE_VLLM_STARTUP_S": "0.2", **(env or {})}
    # The fixture puts "--gpu-probe none" first; the later option wins in click.
    return supervise("--gpu-probe", "auto", *sup_args, vllm_args=("-tp", str(tp)), env=e, **kw)


def _finish_released(run, gpus: Gpus, base: list[float], code: int) -> dict:
    """Exit code, the report's VRAM verdict, and the test's own NVML reading."""
    got = run.finish(timeout=180)
    assert got == code, f"exit {got}, expected {code}; stderr tail:\n{run.stderr()[-4000:]}"
    rep = run.report()
    assert rep["exit_code"] == code
    vram = rep["vram"]
    assert vram["status"] == "released", json.dumps(vram, indent=1)
    assert not vram["timed_out"] and vram["released_t"] is not None, vram
    assert not [h for h in vram["holders"] if h["ours"]], vram["holders"]
    gpus.assert_back(base)
    return rep


def _gpus_sampled(run, name: str) -> int:
    """GPUs on which the supervisor's VRAM ledger has seen the tree, from its instance record
    (published again whenever that changes)."""
    try:
        rec = json.loads((run.tmp / "state" / f"{name}.json").read_text())
    except (OSError, ValueError):
        return 0
    return sum(1 for g in rec.get("gpus", []) if g.get("used"))


def _sent(rep: dict, sig: str) -> list[dict]:
    return [s for s in rep["signals"] if s["direction"] == "sent" and s["signal"] == sig]


# ---------------------------------------------------------------- obedient trees


@pytest.mark.parametrize("tp", [1, 2])
def test_obedient_tree_releases_vram_on_sigterm(supervise, gpus, tp):
    if tp > gpus.count:
        pytest.skip(f"tp {tp} needs {tp} GPUs, NVML sees {gpus.count}")
    base = gpus.baseline()
    name = f"gpu-tp{tp}"
    run = _start(supervise, "--grace", "20", "--name", name, tp=tp)
    run.wait_ready(READY_TIMEOUT_S)
    workers = run.tree_pids()["workers"]
    gpus.assert_held(base, workers=tp)
    if tp == gpus.count:  # one worker on each GPU, whatever the ordinal order
        gpus.assert_held(base, {i: 1 for i in range(tp)})
    visible = gpus.pids()
    wait_until(lambda: _gpus_sampled(run, name) >= tp, 30,
               "the supervisor's VRAM ledger to see the tree on each of its GPUs")
    run.signal(signal.SIGTERM)
    rep = _finish_released(run, gpus, base, 0)
    assert not rep["escalated"] and not _sent(rep, "SIGKILL")
    peaks = rep["vram"]["peak_by_process"]
    for w in workers:
        assert any(p["pid"] == w and p["peak_mib"] >= ALLOC_MIB for p in peaks), (
            f"worker {w} has no peak >= {ALLOC_MIB} MiB in {peaks}; NVML listed pids "
            f"{sorted(visible)} while serving (a PID namespace hides them if they differ)")


# ---------------------------------------------------------------- workers that do not obey


@pytest.mark.parametrize("misbehave", ["worker-hangs-shutdown",
                                       "worker-setsid,worker-hangs-shutdown"])
def test_worker_deaf_to_sigterm_while_holding_vram_is_killed_and_vram_released(
        supervise, gpus, misbehave):
    tp = min(2, gpus.count)
    base = gpus.baseline()
    run = _start(supervise, "--grace", "2", tp=tp, env={"FAKE_VLLM_MISBEHAVE": misbehave})
    run.wait_ready(READY_TIMEOUT_S)
    pids = run.tree_pids()
    gpus.assert_held(base, workers=tp)
    if "worker-setsid" in misbehave:
        for w in pids["workers"]:
            assert os.getpgid(w) != pids["api"], "the worker did not leave the group"
    run.signal(signal.SIGTERM)
    rep = _finish_released(run, gpus, base, 4)
    assert rep["escalated"] and _sent(rep, "SIGKILL")
    if "worker-setsid" in misbehave:
        targets = " ".join(s["target"] for s in _sent(rep, "SIGKILL"))
        assert all(str(w) in targets for w in pids["workers"]), targets


# ---------------------------------------------------------------- orphaned engine (vllm#55510)


def _identities(pidfile: Path, root: int) -> dict[int, float]:
    """(pid -> create_time) of every process the direct launch made: the pidfile's, plus
    any descendant of the API server seen now."""
    pids = {root}
    try:
        for value in json.loads(pidfile.read_text()).values():
            pids.update(value if isinstance(value, list) else [value])
    except (OSError, ValueError):
        pass
    try:
        pids.update(c.pid for c in psutil.Process(root).children(recursive=True))
    except psutil.Error:
        pass
    out = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid).create_time()
        except psutil.Error:
            pass
    return out


def test_orphaned_engine_holds_vram_without_supervisor_and_is_released_with_it(
        supervise, gpus, tmp_path):
    tp = min(2, gpus.count)
    # Negative control, no supervisor: SIGKILL of the API server alone leaves the engine
    # and its workers running, and their GPU memory held.
    base = gpus.baseline()
    pidfile, port = tmp_path / "direct-pids.json", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_VLLM_")}
    env.update(PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
               FAKE_VLLM_CUDA_MIB=str(ALLOC_MIB), FAKE_VLLM_STARTUP_S="0.2",
               FAKE_VLLM_PIDFILE=str(pidfile))
    err_path = tmp_path / "direct.err"
    with open(tmp_path / "direct.out", "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_supervisor.sim", "serve", "m",
             "--port", str(port), "-tp", str(tp)],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            start_new_session=True)
    launched = {proc.pid: psutil.Process(proc.pid).create_time()}
    try:
        wait_until(lambda: proc.poll() is not None or http_get(port)[0] == 200,
                   READY_TIMEOUT_S, "/health to answer")
        assert proc.poll() is None, f"not ready; stderr:\n{err_path.read_text()}"
        launched.update(_identities(pidfile, proc.pid))
        pids = json.loads(pidfile.read_text())
        gpus.assert_held(base, workers=tp)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert not survivors([pids["tracker"]], 10)  # the API server's pipes are closed
        # The scenario is that nothing happens (vllm#55510): the engine watches nothing that
        # the API server's death changes, so no event marks "it would have died by now".
        time.sleep(3.0)
        assert alive(pids["engine"]) and all(alive(w) for w in pids["workers"])
        gpus.assert_held(base, workers=tp)  # still held: nobody stopped the orphans
    finally:
        launched.update(_identities(pidfile, proc.pid))
        kill_all(launched)  # ours only: by PID, identity checked
        if proc.poll() is None:
            proc.wait(10)
        left = survivors(launched, 15)
        assert not left, f"could not end {sorted(left)}"
    gpus.assert_back(base, timeout=30)

    # The same kill under the supervisor: vLLM's 137 passed on, the leftovers stopped, and
    # the memory verified back.
    base = gpus.baseline()
    run = _start(supervise, "--grace", "10", tp=tp)
    run.wait_ready(READY_TIMEOUT_S)
    pids = run.tree_pids()
    gpus.assert_held(base, workers=tp)
    os.kill(pids["api"], signal.SIGKILL)
    rep = _finish_released(run, gpus, base, 128 + signal.SIGKILL)
    assert not rep["requested"]
    ended = {p["pid"] for p in rep["processes"]}
    assert {pids["engine"], *pids["workers"]} <= ended


# ---------------------------------------------------------------- CUDA_VISIBLE_DEVICES


def _alloc_line(text: str, rank: int, pid: int) -> str:
    lines = [ln for ln in text.splitlines()
             if f"(Worker_TP{rank} pid={pid})" in ln and "allocated" in ln]
    assert lines, f"no allocation line for rank {rank}"
    return lines[0]


def test_cuda_visible_devices_as_a_uuid(supervise, gpus, tmp_path):
    target = 1 if gpus.count >= 2 else 0
    uuid = gpus.uuids[target]
    base = gpus.baseline()
    out = tmp_path / "uuid.out"
    with open(out, "wb") as f:
        run = _start(supervise, "--grace", "20", tp=1, env={"CUDA_VISIBLE_DEVICES": uuid},
                     stdout=f)
        run.wait_ready(READY_TIMEOUT_S)
        worker = run.tree_pids()["workers"][0]
        gpus.assert_held(base, {target: 1})
        run.signal(signal.SIGTERM)
        rep = _finish_released(run, gpus, base, 0)
    assert [g["uuid"] for g in rep["vram"]["per_gpu"]] == [uuid], rep["vram"]["per_gpu"]
    line = _alloc_line(out.read_text(), 0, worker)
    assert "cuda:0" in line
    assert "uuid unknown" in line or uuid.lower() in line.lower(), line


def test_cuda_visible_devices_reordered(supervise, gpus, tmp_path):
    if gpus.count < 2:
        pytest.skip(f"needs 2 GPUs, NVML sees {gpus.count}")
    base = gpus.baseline()
    out = tmp_path / "reorder.out"
    with open(out, "wb") as f:
        run = _start(supervise, "--grace", "20", tp=2, env={"CUDA_VISIBLE_DEVICES": "1,0"},
                     stdout=f)
        run.wait_ready(READY_TIMEOUT_S)
        workers = run.tree_pids()["workers"]
        gpus.assert_held(base, {0: 1, 1: 1})
        run.signal(signal.SIGTERM)
        rep = _finish_released(run, gpus, base, 0)
    assert {g["uuid"] for g in rep["vram"]["per_gpu"]} == set(gpus.uuids[:2])
    text = out.read_text()
    # cuda:0 is the first listed device: physical GPU 1 (CUDA and NVML ordinals agree on
    # identical GPUs; CUDA_DEVICE_ORDER=PCI_BUS_ID makes them agree everywhere).
    for rank, nvml_index in ((0, 1), (1, 0)):
        line = _alloc_line(text, rank, workers[rank])
        assert f"cuda:{rank}" in line
        assert "uuid unknown" in line or gpus.uuids[nvml_index].lower() in line.lower(), line


# ---------------------------------------------------------------- NCCL with a dead peer


def test_rank_dies_in_collective_survivor_needs_sigkill_and_vram_comes_back(supervise, gpus):
    """vllm PR #39846: rank 1 dies, rank 0 sits in an all_reduce that never completes and
    never runs its SIGTERM handler; only SIGKILL ends it."""
    if gpus.count < 2:
        pytest.skip(f"an NCCL group of 2 needs 2 GPUs, NVML sees {gpus.count}")
    grace = 3.0
    base = gpus.baseline()
    run = _start(supervise, "--grace", str(grace), tp=2,
                 env={"FAKE_VLLM_NCCL": "1", "FAKE_VLLM_MISBEHAVE": "rank-dies-in-collective"})
    run.wait_ready(READY_TIMEOUT_S)
    rank0, rank1 = run.tree_pids()["workers"]
    assert not survivors([rank1], 60), "rank 1 did not exit"
    run.wait_for(DEAD_PEER_ENTER, timeout=60)
    # Rank 0 is in the collective now and stays there: the report's SIGKILL, no sooner than
    # the grace after SIGTERM, and no DEAD_PEER_RETURNED line all along, show it below.
    assert alive(rank0), f"rank 0 left the dead collective:\n{run.stderr()[-3000:]}"
    assert DEAD_PEER_RETURNED not in run.stderr(), run.stderr()[-3000:]
    gpus.assert_held(base, workers=1)
    run.signal(signal.SIGTERM)
    rep = _finish_released(run, gpus, base, 4)
    assert DEAD_PEER_RETURNED not in run.stderr(), run.stderr()[-3000:]
    received = next(s for s in rep["signals"] if s["direction"] == "received")["t"]
    kill_t = _sent(rep, "SIGKILL")[0]["t"]
    assert kill_t - received >= grace - 0.1, "SIGKILL before the grace: rank 0 was not stuck"
    assert not alive(rank0)
