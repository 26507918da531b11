"""Misbehaviours of the simulated vLLM, and the helpers of its normal tree (the
resource tracker, simulated VRAM files). Runs in forked, single-threaded processes."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from vllm_supervisor.sim.plumbing import (
    OUT_LOCK,
    child_setup,
    emit,
    flush,
    fork,
    kill,
    log,
    read_all,
    set_title,
    stdio_to_devnull,
    write_all,
    write_json_atomic,
)

# ---------------------------------------------------------------- helpers of the normal tree


def tracker_main(r: int) -> int:
    """The resource-tracker-like helper: deaf to SIGTERM/SIGINT, exits at EOF on its stdin."""
    child_setup({r}, on_term="ignore")  # multiprocessing's tracker ignores them too
    os.dup2(r, 0)
    os.close(r)
    set_title(f"{sys.executable} -c from multiprocessing.resource_tracker import main;main(0)",
              comm=os.path.basename(sys.executable))
    while os.read(0, 4096):
        pass
    return 0


def start_ticks(pid: int) -> int:
    """PID's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    return int(raw[raw.rfind(b")") + 2 :].split()[19])


def free_vram(cfg, rank: int) -> tuple[int, int] | None:
    """(free, total) bytes of this worker's simulated GPU (the one ``write_vram`` writes to),
    as ``SimulatedGpuProbe`` reads it now; None without simulated VRAM."""
    if not cfg.gpu_dir or cfg.vram_mib <= 0:
        return None
    from vllm_supervisor.sim.gpu import SimulatedGpuProbe  # only where it is needed

    reading = SimulatedGpuProbe(cfg.gpu_dir, cfg.num_gpus).read()[rank % cfg.num_gpus]
    total = reading.total_mib
    return int((total - reading.used_mib) * 2**20), int(total * 2**20)


def write_vram(cfg, rank: int) -> None:
    """Simulated allocation of this worker: one alloc-<pid>-<gpu>.json, never deleted."""
    if not cfg.gpu_dir or cfg.vram_mib <= 0:
        return
    gpu, pid = rank % cfg.num_gpus, os.getpid()
    write_json_atomic(os.path.join(cfg.gpu_dir, f"alloc-{pid}-{gpu}.json"), {
        "pid": pid, "start_ticks": start_ticks(pid), "gpu": gpu,
        "mib": cfg.vram_mib, "release_delay_s": cfg.vram_release_delay_s})


def write_leak(cfg) -> None:
    """Memory held with no process (like a stale CUDA IPC handle): alloc-leak-<gpu>.json."""
    if not cfg.gpu_dir or cfg.vram_leak_mib <= 0:
        return
    write_json_atomic(os.path.join(cfg.gpu_dir, "alloc-leak-0.json"), {
        "pid": None, "start_ticks": None, "gpu": 0, "mib": cfg.vram_leak_mib,
        "release_delay_s": 0.0})


# ---------------------------------------------------------------- misbehaviours


def spawn_tp0_helpers(misbehave) -> dict[str, int]:
    """Worker TP0's escapees: a double-forked daemon and/or a stdout-holding child."""
    extras = {}
    if "grandchild-daemon" in misbehave:
        r, w = os.pipe()
        middle = fork(_daemon_parent, w)
        os.close(w)
        extras["daemon"] = int(read_all(r))
        os.waitpid(middle, 0)
    if "grandchild-holds-stdout" in misbehave:
        extras["holder"] = fork(_holder_main)
    return extras


def _daemon_parent(w: int) -> int:
    child_setup({w})
    os.setsid()
    os.write(w, b"%d" % fork(_daemon_main))
    return 0  # exits at once: the daemon is adopted by init (or the nearest subreaper)


def _daemon_main() -> int:
    child_setup((), "VLLM::Daemon", "Daemon", on_term="ignore")
    stdio_to_devnull()
    while True:
        time.sleep(3600)


def _holder_main() -> int:
    # Keeps fds 1 and 2 (the supervisor's log pipes) open after its worker is gone.
    child_setup((), "VLLM::StdoutHolder", "StdoutHolder", on_term="ignore")
    while True:
        time.sleep(3600)


def spawn_late_daemon(path: str) -> None:
    """A daemon that leaves the session and clears its whole environment (no instance
    token, no group): only a walk of the tree while it lives can know it. Writes its pid
    to PATH."""
    r, w = os.pipe()
    middle = fork(_late_parent, w)
    os.close(w)
    pid = int(read_all(r))
    os.waitpid(middle, 0)
    write_json_atomic(path, {"pid": pid})


def _late_parent(w: int) -> int:
    child_setup({w})
    os.setsid()
    os.write(w, b"%d" % fork(_late_main))
    return 0


def _late_main() -> int:
    stdio_to_devnull()
    os.execve("/bin/sleep", ["sleep", "100000"], {})
    return 1


def spawn_orphans(count: int, life_s: float) -> list[int]:
    """Fork a middle process that forks ``count`` children and exits; their pids."""
    r, w = os.pipe()
    middle = fork(_orphan_parent, count, life_s, w)
    os.close(w)
    pids = json.loads(read_all(r) or b"[]")
    os.waitpid(middle, 0)
    return pids


def _orphan_parent(count: int, life_s: float, w: int) -> int:
    child_setup({w})
    pids = [fork(_orphan_main, life_s) for _ in range(count)]
    os.write(w, json.dumps(pids).encode())
    return 0


def _orphan_main(life_s: float) -> int:
    child_setup((), "VLLM::Orphan", "Orphan")
    stdio_to_devnull()
    time.sleep(life_s)
    return 0  # then a zombie until whoever adopted it reaps it


def flood_stdout(count: int, last_line: str | None) -> None:
    """``count`` lines "log line <i>" (i from 1) in big raw writes, then ``last_line`` unended."""
    flush()
    t0 = time.monotonic()
    for start in range(1, count + 1, 8192):
        stop = min(count, start + 8191)
        chunk = b"".join(b"log line %d\n" % i for i in range(start, stop + 1))
        with OUT_LOCK:
            if not write_all(1, chunk):
                break
    if last_line:
        with OUT_LOCK:
            write_all(1, last_line.encode())
    emit(f"INFO fake: log flood done: {count} lines in {time.monotonic() - t0:.3f} s", err=True)


def crash(code: int) -> None:
    """Exit at once without touching children; a code >= 128 dies by signal code-128."""
    log("ERROR", f"simulated crash: exiting with code {code}, children left alone")
    flush()
    if 128 < code < 128 + signal.NSIG:
        sig = code - 128
        try:
            signal.signal(sig, signal.SIG_DFL)  # our own handler would swallow SIGTERM/SIGINT
        except (OSError, ValueError):
            pass  # SIGKILL and SIGSTOP cannot be caught anyway
        kill(os.getpid(), sig)
        time.sleep(1)  # signals whose default is to be ignored fall through to os._exit
    os._exit(code & 0xFF)
