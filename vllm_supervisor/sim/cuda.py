"""Real CUDA memory (and a real NCCL group) for the simulated vLLM's workers.

Knobs (read in ``simulated.Config.fill_from_env``):

- ``FAKE_VLLM_CUDA_MIB=N``: each worker, while "loading the model", allocates N MiB in one
  tensor on ``cuda:<tp_rank % device_count>`` (ordinals relative to CUDA_VISIBLE_DEVICES, as
  in vLLM), synchronizes, keeps it for its whole life, and only then reports "loaded" - so
  /health answering 200 implies the memory is held.
- ``FAKE_VLLM_NCCL=1`` (needs tp >= 2 and CUDA_MIB > 0): the workers also form a
  ``torch.distributed`` NCCL group on ``tcp://127.0.0.1:<port>`` (the engine picks the port
  before forking them) and do one all_reduce before reporting "loaded".
- ``FAKE_VLLM_CHECK_FREE=1``: before loading, each worker reads its device's free memory
  (``torch.cuda.mem_get_info``) and fails to start when it is below CUDA_MIB (see
  ``engine``).
- misbehaviour ``rank-dies-in-collective`` (needs NCCL): ``FAKE_VLLM_COLLECTIVE_AFTER_S``
  (default 0.5) after loading, rank 1 ``os._exit(1)``s without any teardown and every other
  rank enters an all_reduce + synchronize that never completes (a dead peer: the NCCL
  deadlock of vllm PR #39846).

torch is imported here only, and only inside a worker, after fork: the API server and the
engine never import torch or touch CUDA, so their forks stay safe.

Why rank 0 cannot leave the dead collective by itself: the process group is created with a
24 h timeout (the watchdog would otherwise time the collective out after 10 min and abort
the communicator, which ends the kernel), ``TORCH_NCCL_ASYNC_ERROR_HANDLING=0`` (no
tear-down on an asynchronous NCCL error) and ``TORCH_NCCL_ENABLE_MONITORING=0`` (no heartbeat
monitor that kills a stuck process). ``torch.cuda.synchronize()`` then blocks in C, so the
worker's SIGTERM handler never runs: only SIGKILL ends it. ``NCCL_NVLS_ENABLE=0`` keeps
NVLink multicast off; ``NCCL_SOCKET_IFNAME`` defaults to ``lo`` (all ranks share one host).
``NCCL_P2P_DISABLE`` is left as the environment has it.
"""

from __future__ import annotations

import datetime
import os
import socket

from vllm_supervisor.sim.plumbing import flush, hang_forever, log

# Forced in every worker that joins the NCCL group (before torch.distributed reads them).
NCCL_ENV = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "0",
    "TORCH_NCCL_ENABLE_MONITORING": "0",
    "NCCL_NVLS_ENABLE": "0",
}
NCCL_TIMEOUT = datetime.timedelta(hours=24)
DEAD_PEER_ENTER = "entering all_reduce with a dead peer"
DEAD_PEER_RETURNED = "all_reduce with a dead peer came back"

_held: list = []  # the tensors: alive as long as the worker is


def free_port() -> int:
    """A loopback TCP port nothing listens on now (the engine's pick for the NCCL store)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_error(cfg) -> str | None:
    """Why the CUDA/NCCL knobs do not fit together, or None."""
    if cfg.cuda_mib < 0:
        return "FAKE_VLLM_CUDA_MIB must be >= 0"
    if cfg.nccl and (cfg.tp < 2 or cfg.cuda_mib <= 0):
        return "FAKE_VLLM_NCCL=1 needs --tensor-parallel-size >= 2 and FAKE_VLLM_CUDA_MIB > 0"
    if cfg.has("rank-dies-in-collective") and not cfg.nccl:
        return "rank-dies-in-collective needs FAKE_VLLM_NCCL=1"
    return None


def free_memory(cfg, rank: int) -> tuple[int, int] | None:
    """(free, total) bytes of this worker's device (the one ``load`` allocates on), from
    ``torch.cuda.mem_get_info``; None without FAKE_VLLM_CUDA_MIB. Raises as ``load`` does."""
    if cfg.cuda_mib <= 0:
        return None
    torch = _torch(cfg)
    free, total = torch.cuda.mem_get_info(_device(torch, rank))
    return int(free), int(total)


def _torch(cfg):
    if cfg.nccl:
        os.environ.update(NCCL_ENV)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    import torch  # here only: after fork, in a worker

    return torch


def _device(torch, rank: int) -> int:
    count = torch.cuda.device_count()
    if count < 1:
        raise RuntimeError("FAKE_VLLM_CUDA_MIB is set but torch sees no CUDA device "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    return rank % count


def load(cfg, rank: int) -> None:
    """The worker's "model loading": allocate FAKE_VLLM_CUDA_MIB on its device (and join the
    NCCL group). Raises on any CUDA error, which fails the worker during startup."""
    if cfg.cuda_mib <= 0:
        return
    torch = _torch(cfg)
    dev = _device(torch, rank)
    count = torch.cuda.device_count()
    torch.cuda.set_device(dev)
    tensor = torch.empty(cfg.cuda_mib * 2**20, dtype=torch.uint8, device=f"cuda:{dev}")
    torch.cuda.synchronize(dev)
    _held.append(tensor)
    log("INFO", f"allocated {cfg.cuda_mib} MiB on cuda:{dev} ({_uuid(torch, dev)})",
        "gpu_model_runner.py")
    if cfg.nccl:
        _join_group(torch, cfg, rank, dev, count)


def _join_group(torch, cfg, rank: int, dev: int, count: int) -> None:
    import torch.distributed as dist

    if count < cfg.tp:  # NCCL refuses two ranks on one GPU
        raise RuntimeError(f"FAKE_VLLM_NCCL=1 with tp {cfg.tp} needs {cfg.tp} GPUs; "
                           f"torch sees {count}")
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{cfg.nccl_port}",
                            rank=rank, world_size=cfg.tp, timeout=NCCL_TIMEOUT)
    x = torch.ones(1, device=f"cuda:{dev}")
    dist.all_reduce(x)
    torch.cuda.synchronize(dev)
    got = x.item()
    if got != cfg.tp:
        raise RuntimeError(f"all_reduce of ones over {cfg.tp} ranks gave {got}")
    _held.append(x)
    log("INFO", f"NCCL group up: rank {rank}/{cfg.tp} on cuda:{dev}, all_reduce ok "
                f"(store tcp://127.0.0.1:{cfg.nccl_port})", "parallel_state.py")


def die_in_collective(rank: int) -> None:
    """rank-dies-in-collective: rank 1 vanishes; every other rank blocks in a collective
    with the dead peer. Never returns."""
    if rank == 1:
        log("WARNING", "rank 1 exits now without teardown (rank-dies-in-collective)",
            "worker.py")
        flush()
        os._exit(1)
    import torch
    import torch.distributed as dist

    dev = torch.cuda.current_device()
    log("WARNING", f"rank {rank}: {DEAD_PEER_ENTER} (simulated NCCL deadlock, vllm#39846)",
        "worker.py")
    try:
        x = torch.ones(1, device=f"cuda:{dev}")
        dist.all_reduce(x)
        torch.cuda.synchronize(dev)
        outcome = f"returned {x.item()}"
    except BaseException as exc:  # noqa: BLE001 - any way out is reported, none is taken
        outcome = f"raised {type(exc).__name__}: {exc}"
    # Not expected: say so loudly (tests look for this line), then still behave like a hung
    # rank that holds its memory, so the stop still needs SIGKILL.
    log("ERROR", f"rank {rank}: {DEAD_PEER_RETURNED} ({outcome}); hanging instead",
        "worker.py")
    hang_forever()


def _uuid(torch, dev: int) -> str:
    try:
        text = str(torch.cuda.get_device_properties(dev).uuid)
    except Exception:  # noqa: BLE001 - older torch: no uuid property
        return "uuid unknown"
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"
