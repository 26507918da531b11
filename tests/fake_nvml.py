"""A fake `pynvml` module for CPU-only CI: the NVML edge, scripted per test."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

MIB = 1024 * 1024
NA = (1 << 64) - 1  # NVML_VALUE_NOT_AVAILABLE_ulonglong


class NVMLError(Exception):
    """Like pynvml.NVMLError: str() is the NVML message."""


@dataclass
class FakeGpu:
    uuid: str
    bus: str
    used_mib: float | Callable[[], float] = 615.0
    total_mib: float = 81559.0
    procs: list | Callable[[], list] = field(default_factory=list)  # [(pid, mib|None)]
    name: str = "NVIDIA H200"
    cc: tuple = (9, 0)
    error: str | None = None  # every memory/process query on this GPU fails
    migs: dict = field(default_factory=dict)  # MIG uuid -> FakeGpu


def _val(v):
    return v() if callable(v) else v


class FakeNvml:
    """The subset of pynvml that vllm_supervisor.nvml uses."""

    NVMLError = NVMLError

    def __init__(self, gpus: list[FakeGpu], init_error: str | None = None):
        self.gpus = gpus
        self.init_error = init_error
        self.calls = 0

    def nvmlInit(self):
        if self.init_error:
            raise NVMLError(self.init_error)

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.gpus[i]

    def nvmlDeviceGetIndex(self, h):
        return self.gpus.index(h)

    def nvmlDeviceGetUUID(self, h):
        return h.uuid

    def nvmlDeviceGetName(self, h):
        return h.name

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return h.cc

    def nvmlDeviceGetPciInfo(self, h):
        return SimpleNamespace(busId=h.bus.encode())

    def nvmlDeviceGetHandleByUUID(self, uuid):
        for g in self.gpus:
            if g.uuid == uuid:
                return g
            if uuid in g.migs:
                return g.migs[uuid]
        raise NVMLError("Not Found")

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, mig):
        for g in self.gpus:
            if mig in g.migs.values():
                return g
        raise NVMLError("Invalid Argument")

    def _check(self, h):
        self.calls += 1
        if h.error:
            raise NVMLError(h.error)

    def nvmlDeviceGetMemoryInfo(self, h):
        self._check(h)
        used = _val(h.used_mib)
        if used is None:
            raise NVMLError("Not Supported")
        return SimpleNamespace(used=int(used * MIB), total=int(h.total_mib * MIB))

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        self._check(h)
        return [SimpleNamespace(pid=pid, usedGpuMemory=NA if mib is None else int(mib * MIB))
                for pid, mib in _val(h.procs)]

    def nvmlDeviceGetGraphicsRunningProcesses(self, h):
        self._check(h)
        return []


def h200s(n: int, buses=None) -> list[FakeGpu]:
    """N identical GPUs; BUSES gives each one's PCI bus id (default in index order)."""
    buses = buses or [f"00000000:{0x18 + 0x10 * i:02X}:00.0" for i in range(n)]
    return [FakeGpu(f"GPU-{i:08x}-1111-2222-3333-44444444444{i}", buses[i]) for i in range(n)]
