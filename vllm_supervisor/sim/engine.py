"""The simulated VLLM::EngineCore and VLLM::Worker_TP<rank> processes."""

from __future__ import annotations

import os
import signal
import time

from vllm_supervisor.sim import cuda
from vllm_supervisor.sim import misbehave as mis
from vllm_supervisor.sim.config import Config
from vllm_supervisor.sim.plumbing import (
    Child,
    Lines,
    child_setup,
    flush,
    fork,
    hang_forever,
    log,
    select_fds,
    send,
)

VERSION = "0.0.0-simulated"


def _join_inherited_group_and_hang() -> None:
    """vllm#7939: with RANK/WORLD_SIZE/MASTER_ADDR inherited from a torchrun job, the
    rendezvous waits for ranks that never come: silent, no CPU, deaf to SIGTERM."""
    env = os.environ
    if int(env.get("WORLD_SIZE", "1") or 1) > 1 and "RANK" in env and "MASTER_ADDR" in env:
        log("INFO", f"world_size={env['WORLD_SIZE']} rank={env['RANK']} "
                    f"distributed_init_method=env:// backend=gloo", "parallel_state.py")
        flush()
        while True:
            time.sleep(3600)


def engine_main(cfg: Config, ready_w: int) -> int:
    """VLLM::EngineCore: start the workers, wait until they loaded, report ready, serve."""
    ignores = cfg.has("engine-ignores-term")
    sigs = child_setup({ready_w}, "VLLM::EngineCore", "EngineCore_DP0",
                       on_term="ignore" if ignores else "pipe")
    log("INFO", f"Initializing a V1 LLM engine (v{VERSION}) with config: model={cfg.model!r}, "
                f"tensor_parallel_size={cfg.tp}", "core.py")
    _join_inherited_group_and_hang()
    # Nobody writes ctrl: workers see EOF on it exactly when this process is gone. The engine
    # itself deliberately does not watch its parent (vllm#55510: it outlives a SIGKILLed API).
    ctrl_r, _ctrl_w = os.pipe()  # the write end just stays open here
    rep_r, rep_w = os.pipe()
    cfg.nccl_port = cuda.free_port() if cfg.nccl else 0
    workers = {rank: Child(fork(worker_main, cfg, rank, ctrl_r, rep_w)) for rank in range(cfg.tp)}
    os.close(ctrl_r)
    os.close(rep_w)
    lines, started = Lines(rep_r), time.monotonic()
    hello: dict[int, dict] = {}
    loaded: set[int] = set()
    announced = ready = False
    reported: set[int] = set()
    while True:
        got = select_fds([rep_r if lines.open else None, sigs.r if sigs else None], 0.2)
        if sigs and sigs.r in got and sigs.drain():
            return _stop_workers(workers, 0)
        for kind, payload in (lines.read() or []) if rep_r in got else []:
            if kind == "hello":
                hello[payload["rank"]] = payload
            elif kind == "loaded":
                loaded.add(payload["rank"])
        if not announced and len(hello) == cfg.tp:
            announced = True  # the tree is complete (before loading ends): tell the API server
            extras = {k: v for p in hello.values() for k, v in p.items() if k not in ("rank", "pid")}
            workers_pids = [hello[rank]["pid"] for rank in sorted(hello)]
            send(ready_w, "tree", {"engine": os.getpid(), "workers": workers_pids, **extras})
        if not ready and len(loaded) == cfg.tp:
            ready = True
            mis.write_leak(cfg)
            log("INFO", f"init engine (profile, create kv cache, warmup model) took "
                        f"{time.monotonic() - started:.2f} seconds", "core.py")
            send(ready_w, "ready", {})
        for rank, worker in workers.items():
            if rank not in reported and not worker.alive():
                reported.add(rank)
                if not ready:  # a worker lost during startup fails the engine, as in vLLM
                    log("ERROR", f"Worker TP{rank} died during startup", "multiproc_executor.py")
                    return _stop_workers(workers, 1)
                log("WARNING", f"Worker TP{rank} (pid {worker.pid}) exited with status "
                               f"{worker.status}", "multiproc_executor.py")


def _stop_workers(workers: dict[int, Child], code: int) -> int:
    log("INFO", "Shutting down engine core; terminating workers", "core.py")
    for worker in workers.values():
        if worker.alive():
            os.kill(worker.pid, signal.SIGTERM)
    for worker in workers.values():
        worker.wait()  # forever: a hung worker hangs the engine, as in vLLM
    return code


def worker_main(cfg: Config, rank: int, ctrl_r: int, rep_w: int) -> int:
    """VLLM::Worker_TP<rank>: load (sleep), report, then live until SIGTERM or engine death."""
    if cfg.has("worker-setsid"):
        os.setsid()  # leaves the API server's process group and session
    sigs = child_setup({ctrl_r, rep_w}, f"VLLM::Worker_TP{rank}", f"Worker_TP{rank}", "pipe")
    extras = mis.spawn_tp0_helpers(cfg.misbehave) if rank == 0 else {}
    send(rep_w, "hello", {"rank": rank, "pid": os.getpid(), **extras})
    load_at, exit_at, late_at = time.monotonic() + cfg.startup_s, None, None
    while True:
        now = time.monotonic()
        wake = min((t for t in (load_at, exit_at, late_at) if t is not None), default=None)
        got = select_fds([sigs.r, ctrl_r], None if wake is None else wake - now)
        if sigs.r in got and sigs.drain():
            return _worker_exit(cfg)
        if ctrl_r in got:  # EOF: the engine is gone
            log("INFO", "Parent process exited, terminating worker queues",
                "multiproc_executor.py")
            return _worker_exit(cfg)
        now = time.monotonic()
        if load_at is not None and now >= load_at:
            load_at = None
            mis.write_vram(cfg, rank)
            cuda.load(cfg, rank)  # real CUDA memory, held before "loaded" (FAKE_VLLM_CUDA_MIB)
            log("INFO", f"Model loading took {cfg.startup_s:.2f} s", "gpu_model_runner.py")
            send(rep_w, "loaded", {"rank": rank})
            if "holder" in extras:
                exit_at = now + 0.5
            elif cfg.has("rank-dies-in-collective"):
                exit_at = time.monotonic() + cfg.collective_after_s
            if rank == 0 and cfg.late_daemon_file:
                late_at = now + cfg.late_daemon_s
        elif late_at is not None and now >= late_at:
            late_at = None
            mis.spawn_late_daemon(cfg.late_daemon_file)
        elif exit_at is not None and now >= exit_at:
            if cfg.has("rank-dies-in-collective"):
                cuda.die_in_collective(rank)  # never returns
            log("WARNING", "worker exiting by itself (grandchild-holds-stdout)", "worker.py")
            return 0


def _worker_exit(cfg: Config) -> int:
    if cfg.has("worker-hangs-shutdown"):
        log("INFO", "destroy_process_group() ... (simulated NCCL hang)", "parallel_state.py")
        hang_forever()
    return 0
