"""The NVML probe (nvidia-ml-py, imported as pynvml). Every call goes through _q()."""

from __future__ import annotations

from vllm_supervisor.gpu import MIB, GpuReading, NoGpuProbe


def _hint(err: Exception) -> str:
    text = str(err)
    if "Driver Not Loaded" in text or "Library Not Found" in text or "libnvidia-ml" in text:
        return f"{text} (no NVIDIA driver here: is this a GPU machine, or a container " \
               "started without --gpus?)"
    if "Insufficient Permissions" in text or "No Permission" in text:
        return f"{text} (the user cannot open /dev/nvidia*: check its groups)"
    return text


class NvmlProbe:
    """Reads memory in use and per-process memory of the GPUs in scope."""

    name = "nvml"

    def __init__(self, pynvml, indices: list[int]):
        self.nv = pynvml
        self.indices = indices
        self.handles = {i: pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices}
        self.uuids = {i: _str(pynvml.nvmlDeviceGetUUID(h)) for i, h in self.handles.items()}

    def available(self) -> str | None:
        """Usable once initialised with at least one GPU."""
        return None if self.indices else "NVML sees no GPU in scope"

    def read(self) -> list[GpuReading]:
        """One reading per GPU; an error on one GPU is reported on that GPU only."""
        return [self._read_one(i) for i in self.indices]

    def _read_one(self, index: int) -> GpuReading:
        nv, h = self.nv, self.handles[index]
        try:
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            used, total = mem.used / MIB, mem.total / MIB
        except nv.NVMLError as e:
            return GpuReading(index, self.uuids[index], None, None, (), _hint(e))
        procs: dict[int, float | None] = {}
        for fn in (nv.nvmlDeviceGetComputeRunningProcesses,
                   nv.nvmlDeviceGetGraphicsRunningProcesses):
            try:
                for p in fn(h):
                    mib = None if p.usedGpuMemory is None else p.usedGpuMemory / MIB
                    procs[p.pid] = mib if procs.get(p.pid) is None else procs[p.pid]
            except nv.NVMLError as e:
                return GpuReading(index, self.uuids[index], used, total, (), _hint(e))
        return GpuReading(index, self.uuids[index], used, total, tuple(procs.items()))


def _str(v) -> str:
    return v.decode() if isinstance(v, bytes) else v


def open_nvml_probe() -> NvmlProbe | NoGpuProbe:
    """An NVML probe over the GPUs vLLM may use, or a NoGpuProbe saying why not."""
    try:
        import pynvml
    except ImportError:
        return NoGpuProbe("nvidia-ml-py is not installed (pip install nvidia-ml-py)")
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except Exception as e:  # noqa: BLE001 - NVMLError or a missing library
        return NoGpuProbe(f"NVML unavailable: {_hint(e)}")
    if count == 0:
        return NoGpuProbe("NVML reports no GPU")
    return NvmlProbe(pynvml, list(range(count)))


