"""The simulated VLLM::EngineCore and VLLM::Worker_TP<rank> processes: their start-up
(the engine's busy loop once ready is ``core.EngineCore``) and the workers' side of a
step. worker-deadlock: FAKE_VLLM_HANG_AFTER_S after loading, the last rank stops answering
(it blocks for good, deaf to SIGTERM, as a rank stuck in a collective)."""

from __future__ import annotations

import os
import time

from vllm_supervisor.sim import cuda
from vllm_supervisor.sim import misbehave as mis
from vllm_supervisor.sim.config import Config
from vllm_supervisor.sim.core import EngineCore, report_deaths, stop_workers
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


def engine_main(cfg: Config, ready_w: int, api_fd: int) -> int:
    """VLLM::EngineCore: start the workers, wait until they loaded, report ready, serve."""
    ignores = cfg.has("engine-ignores-term")
    sigs = child_setup({ready_w, api_fd}, "VLLM::EngineCore", "EngineCore_DP0",
                       on_term="ignore" if ignores else "pipe")
    log("INFO", f"Initializing a V1 LLM engine (v{VERSION}) with config: model={cfg.model!r}, "
                f"tensor_parallel_size={cfg.tp}", "core.py")
    _join_inherited_group_and_hang()
    # One step pipe per worker, written by this process only: a worker sees EOF on it exactly
    # when the engine is gone. The engine itself deliberately does not watch its parent
    # (vllm#55510: it outlives a SIGKILLed API server).
    steps = {rank: os.pipe() for rank in range(cfg.tp)}
    rep_r, rep_w = os.pipe()
    cfg.nccl_port = cuda.free_port() if cfg.nccl else 0
    workers = {rank: Child(fork(worker_main, cfg, rank, steps[rank][0], rep_w))
               for rank in range(cfg.tp)}
    for r, _ in steps.values():
        os.close(r)
    os.close(rep_w)
    lines, started = Lines(rep_r), time.monotonic()
    hello: dict[int, dict] = {}
    loaded: set[int] = set()
    announced = False
    reported: set[int] = set()
    while len(loaded) < cfg.tp:
        got = select_fds([rep_r if lines.open else None, sigs.r if sigs else None], 0.2)
        if sigs and sigs.r in got and sigs.drain():
            return stop_workers(workers, 0)
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
        if report_deaths(workers, reported, ready=False):
            return stop_workers(workers, 1)
    mis.write_leak(cfg)
    log("INFO", f"init engine (profile, create kv cache, warmup model) took "
                f"{time.monotonic() - started:.2f} seconds", "core.py")
    send(ready_w, "ready", {})
    step_ws = {rank: w for rank, (_, w) in steps.items()}
    return EngineCore(cfg, sigs, workers, step_ws, lines, api_fd, reported).run()


def worker_main(cfg: Config, rank: int, step_r: int, rep_w: int) -> int:
    """VLLM::Worker_TP<rank>: load (sleep), report, then do its part of each engine step
    until SIGTERM or engine death."""
    if cfg.has("worker-setsid"):
        os.setsid()  # leaves the API server's process group and session
    sigs = child_setup({step_r, rep_w}, f"VLLM::Worker_TP{rank}", f"Worker_TP{rank}", "pipe")
    extras = mis.spawn_tp0_helpers(cfg.misbehave) if rank == 0 else {}
    send(rep_w, "hello", {"rank": rank, "pid": os.getpid(), **extras})
    _check_free_memory(cfg, rank)  # FAKE_VLLM_CHECK_FREE: raises, failing the worker
    calls = Lines(step_r)
    load_at, exit_at, late_at, hang_at = time.monotonic() + cfg.startup_s, None, None, None
    while True:
        now = time.monotonic()
        wake = min((t for t in (load_at, exit_at, late_at, hang_at) if t is not None),
                   default=None)
        got = select_fds([sigs.r, step_r], None if wake is None else wake - now)
        if sigs.r in got and sigs.drain():
            return _worker_exit(cfg, rank, orderly=True)
        if step_r in got:
            rpcs = calls.read()
            if rpcs is None:  # EOF: the engine is gone
                log("INFO", "Parent process exited, terminating worker queues",
                    "multiproc_executor.py")
                return _worker_exit(cfg, rank, orderly=False)
            for _, rpc in rpcs:
                _do_rpc(cfg, rank, rpc, rep_w)
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
            if cfg.has("worker-deadlock") and rank == cfg.tp - 1:
                hang_at = now + cfg.hang_after_s
        elif late_at is not None and now >= late_at:
            late_at = None
            mis.spawn_late_daemon(cfg.late_daemon_file)
        elif hang_at is not None and now >= hang_at:
            log("WARNING", f"TP{rank} stops answering the engine (simulated deadlock, "
                           "worker-deadlock)", "worker.py")
            flush()
            hang_forever()
        elif exit_at is not None and now >= exit_at:
            if cfg.has("rank-dies-in-collective"):
                cuda.die_in_collective(rank)  # never returns
            log("WARNING", "worker exiting by itself (grandchild-holds-stdout)", "worker.py")
            return 0


def _do_rpc(cfg: Config, rank: int, rpc: dict, rep_w: int) -> None:
    """This worker's part of one collective call: its share of a step takes the step's
    time; sleep mode logs what it would free."""
    time.sleep(rpc["s"])
    if rpc["method"] == "sleep":
        freed = cfg.vram_mib / 1024 if cfg.enable_sleep_mode else 0.0
        log("INFO", f"Sleep mode freed {freed:.2f} GiB memory, 0.50 GiB memory is still in "
                    "use.", "gpu_worker.py")
    send(rep_w, "done", {"rank": rank, "n": rpc["n"]})


def _check_free_memory(cfg: Config, rank: int) -> None:
    """FAKE_VLLM_CHECK_FREE=1: vLLM's startup check (v1/worker/gpu_worker.py init_device):
    the free memory of this worker's GPU must cover what it is about to take, else
    ValueError (printed with its traceback as the worker dies during startup)."""
    if not cfg.check_free:
        return
    for got, need_mib in ((mis.free_vram(cfg, rank), cfg.vram_mib),
                          (cuda.free_memory(cfg, rank), cfg.cuda_mib)):
        if got is None:
            continue
        free, total = got
        if free < need_mib * 2**20:
            log("ERROR", "WorkerProc failed to start.", "multiproc_executor.py")
            raise ValueError(
                f"Free memory on device ({free / 2**30:.2f}/{total / 2**30:.2f} GiB) on "
                f"startup is less than desired GPU memory utilization "
                f"({need_mib / 1024:.2f} GiB). Decrease GPU memory utilization or reduce "
                f"GPU memory used by other processes.")


def _worker_exit(cfg: Config, rank: int, orderly: bool) -> int:
    """A worker's way out: ``orderly`` after SIGTERM, else after its engine vanished."""
    if orderly and cfg.stop_s > 0:  # slow teardown, memory still held (FAKE_VLLM_STOP_S)
        if rank == 0:
            log("INFO", f"shutdown: taking {cfg.stop_s:g} s (FAKE_VLLM_STOP_S)",
                "multiproc_executor.py")
        flush()
        time.sleep(cfg.stop_s)
    if cfg.has("worker-hangs-shutdown"):
        log("INFO", "destroy_process_group() ... (simulated NCCL hang)", "parallel_state.py")
        hang_forever()
    return 0
