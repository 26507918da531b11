"""What a vLLM launch will take of its GPUs, from its own arguments: how many devices (the
first tensor x pipeline x local data parallel ones it sees) and which fraction of each
one's total memory (vLLM's --gpu-memory-utilization, 0.9 by default)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from vllm_supervisor.errors import UsageError

VLLM_DEFAULT_UTILIZATION = 0.9
# vLLM's spellings of the options that decide the device count (long, then short).
_SIZES = {
    "tp": ("--tensor-parallel-size", "-tp"),
    "pp": ("--pipeline-parallel-size", "-pp"),
    "dp": ("--data-parallel-size", "-dp"),
    "dpl": ("--data-parallel-size-local", "-dpl"),
}
# Options with which vLLM sizes its KV cache in bytes and ignores the utilization.
KV_BYTES_OPTIONS = ("--kv-cache-memory-bytes", "--kv-cache-memory")


@dataclass(frozen=True)
class GpuClaim:
    """COUNT devices, FRACTION of each one's total memory; HOW says where it came from."""

    count: int
    fraction: float
    how: str


def last_value(args: tuple[str, ...], names: tuple[str, ...]) -> str | None:
    """The last value given to any of NAMES (`--x v` or `--x=v`), as vLLM's parser keeps
    the last one."""
    value = None
    for i, a in enumerate(args):
        for name in names:
            if a == name and i + 1 < len(args):
                value = args[i + 1]
            elif a.startswith(name + "="):
                value = a.split("=", 1)[1]
    return value


def _size(args: tuple[str, ...], key: str, default: int | None) -> int | None:
    raw = last_value(args, _SIZES[key])
    if raw is None:
        return default
    try:
        n = int(raw)
    except ValueError:
        raise UsageError(f"vLLM's {_SIZES[key][0]} must be a whole number, got {raw!r}") from None
    if n < 1:
        raise UsageError(f"vLLM's {_SIZES[key][0]} must be at least 1, got {n}")
    return n


def device_count(args: tuple[str, ...]) -> int:
    """GPUs this host's vLLM uses: tensor x pipeline parallel x the local data parallel
    ranks (--data-parallel-size-local, else --data-parallel-size)."""
    tp, pp = _size(args, "tp", 1), _size(args, "pp", 1)
    dp = _size(args, "dp", 1)
    return tp * pp * _size(args, "dpl", dp)


def fraction_value(raw: str, what: str) -> float:
    """A fraction in (0, 1], or a usage error naming WHAT."""
    try:
        f = float(raw)
    except ValueError:
        f = math.nan
    if not 0 < f <= 1:
        raise UsageError(f"{what} must be a fraction in (0, 1], got {raw!r}")
    return f


def claim_of(args: tuple[str, ...], explicit: float | None) -> GpuClaim:
    """The claim of `vllm serve ... ARGS`: --gpu-claim (EXPLICIT) wins; else vLLM's
    --gpu-memory-utilization (default 0.9). When vLLM sizes its cache in bytes the share
    cannot be derived from the arguments: the claim is then 0.9 (what vLLM would take by
    default; claiming too much only makes others wait, too little would let them in)."""
    n = device_count(args)
    if explicit is not None:
        return GpuClaim(n, explicit, "--gpu-claim")
    util = last_value(args, ("--gpu-memory-utilization",))
    if last_value(args, KV_BYTES_OPTIONS) is not None:  # vLLM then ignores the utilization
        return GpuClaim(n, VLLM_DEFAULT_UTILIZATION,
                        "vLLM sizes its KV cache in bytes: claiming 0.9 (give --gpu-claim)")
    if util is None:
        return GpuClaim(n, VLLM_DEFAULT_UTILIZATION, "vLLM's default --gpu-memory-utilization")
    return GpuClaim(n, fraction_value(util, "vLLM's --gpu-memory-utilization"),
                    "vLLM's --gpu-memory-utilization")
