"""The NVML probe (nvidia-ml-py, imported as pynvml), and which GPUs vLLM may use.

CUDA_VISIBLE_DEVICES may hold CUDA ordinals, GPU UUIDs (or unique prefixes of them) or MIG
UUIDs, in any order. CUDA ordinals follow CUDA_DEVICE_ORDER: PCI_BUS_ID is NVML's order;
the default FASTEST_FIRST matches it only when every GPU is of the same kind, so then the
mapping goes through PCI bus IDs, and otherwise every GPU is watched (and the report says
why). Every pynvml call that can fail per device goes through one place, _read_one.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_supervisor.gpu.probe import MIB, GpuReading, NoGpuProbe


def hint(err: Exception) -> str:
    """An NVML error with what to check."""
    text = str(err) or type(err).__name__
    if "Driver Not Loaded" in text or "Library Not Found" in text or "libnvidia-ml" in text:
        return f"{text} (no NVIDIA driver here: is this a GPU machine, or a container " \
               "started without --gpus?)"
    if "Insufficient Permissions" in text or "No Permission" in text:
        return f"{text} (the user cannot open /dev/nvidia*: check its groups)"
    if "GPU is lost" in text or "GPU requires reset" in text:
        return f"{text} (the GPU fell off the bus: see dmesg; it needs a reset)"
    return text


@dataclass(frozen=True)
class Target:
    """One GPU (or MIG instance) in scope."""

    index: int  # NVML index of the GPU (the parent GPU for a MIG instance)
    uuid: str
    handle: object


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class NvmlProbe:
    """Reads memory in use and per-process memory of the GPUs in scope."""

    name = "nvml"

    def __init__(self, nv, targets: list[Target], note: str | None = None):
        self.nv = nv
        self.targets = targets
        self.note = note

    def available(self) -> str | None:
        """Usable once initialised with at least one GPU in scope."""
        return None if self.targets else (self.note or "no GPU in scope")

    def read(self) -> list[GpuReading]:
        """One reading per GPU in scope; an error on one GPU stays on that GPU."""
        return [self._read_one(t) for t in self.targets]

    def _read_one(self, t: Target) -> GpuReading:
        nv = self.nv
        try:
            mem = nv.nvmlDeviceGetMemoryInfo(t.handle)
            used, total = mem.used / MIB, mem.total / MIB
        except nv.NVMLError as e:
            used, total, err = None, None, hint(e)
        else:
            err = None
        procs: dict[int, float | None] = {}
        for fn in (nv.nvmlDeviceGetComputeRunningProcesses,
                   nv.nvmlDeviceGetGraphicsRunningProcesses):
            try:
                for p in fn(t.handle):
                    raw = p.usedGpuMemory
                    # NVML reports N/A (MIG, some containers) as None or as ~0ULL.
                    mib = None if raw is None or raw >= (1 << 63) else raw / MIB
                    if procs.get(p.pid) is None:
                        procs[p.pid] = mib
                    elif mib is not None:
                        procs[p.pid] += mib
            except nv.NVMLError as e:
                err = err or hint(e)
        return GpuReading(t.index, t.uuid, used, total, tuple(procs.items()), err)


def _all_targets(nv) -> list[Target]:
    out = []
    for i in range(nv.nvmlDeviceGetCount()):
        h = nv.nvmlDeviceGetHandleByIndex(i)
        out.append(Target(i, _s(nv.nvmlDeviceGetUUID(h)), h))
    return out


def _kind(nv, t: Target) -> tuple:
    try:
        return (_s(nv.nvmlDeviceGetName(t.handle)),
                tuple(nv.nvmlDeviceGetCudaComputeCapability(t.handle)))
    except nv.NVMLError:
        return (t.uuid,)  # unknown: treat as different


def _by_pci(nv, targets: list[Target]) -> list[Target]:
    def bus(t: Target) -> str:
        try:
            return _s(nv.nvmlDeviceGetPciInfo(t.handle).busId).lower()
        except nv.NVMLError:
            return f"~{t.index:04d}"
    return sorted(targets, key=bus)


def _mig_target(nv, token: str) -> Target | None:
    try:
        mig = nv.nvmlDeviceGetHandleByUUID(token)
        parent = nv.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(mig)
        return Target(nv.nvmlDeviceGetIndex(parent), _s(nv.nvmlDeviceGetUUID(mig)), mig)
    except nv.NVMLError:
        return None


def scope(nv, env: dict[str, str]) -> tuple[list[Target], str | None]:
    """The GPUs a process started with ENV may use, and a note when that is uncertain."""
    every = _all_targets(nv)
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is None:
        return every, None
    tokens = [x.strip() for x in cvd.split(",")]
    if tokens == [""]:
        return [], "CUDA_VISIBLE_DEVICES is empty: vLLM sees no GPU"
    order = env.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST").upper()
    same_kind = len({_kind(nv, t) for t in every}) <= 1
    ordinals = _by_pci(nv, every) if order == "PCI_BUS_ID" or same_kind else None
    out: list[Target] = []
    for tok in tokens:
        t = _token_target(nv, tok, every, ordinals)
        if t == "ambiguous":
            return every, (f"CUDA_VISIBLE_DEVICES={cvd} uses ordinals with "
                           f"CUDA_DEVICE_ORDER={order} on GPUs of different kinds: "
                           "watching every GPU")
        if t is None:
            break  # CUDA ignores the rest of the list after an invalid entry
        if t.uuid not in {x.uuid for x in out}:
            out.append(t)
    return out, None if out else f"CUDA_VISIBLE_DEVICES={cvd!r} names no GPU NVML knows"


def _token_target(nv, tok: str, every: list[Target], ordinals):
    if tok.lstrip("-").isdigit():
        n = int(tok)
        if n < 0:
            return None
        if ordinals is None:
            return "ambiguous"
        return ordinals[n] if n < len(ordinals) else None
    if tok.startswith("MIG-"):
        return _mig_target(nv, tok)
    matches = [t for t in every if t.uuid.startswith(tok)] if tok.startswith("GPU-") else []
    return matches[0] if len(matches) == 1 else None


def open_nvml_probe(env: dict[str, str], nv=None) -> NvmlProbe | NoGpuProbe:
    """An NVML probe over the GPUs vLLM may use, or a NoGpuProbe saying why not."""
    if nv is None:
        try:
            import pynvml as nv
        except ImportError:
            return NoGpuProbe("nvidia-ml-py is not installed (pip install nvidia-ml-py)")
    try:
        nv.nvmlInit()
        targets, note = scope(nv, env)
    except Exception as e:  # noqa: BLE001 - NVMLError, or the library is missing
        return NoGpuProbe(f"NVML unavailable: {hint(e)}")
    if not targets:
        return NoGpuProbe(note or "NVML reports no GPU")
    return NvmlProbe(nv, targets, note)


def make_probe(spec: str, env: dict[str, str]) -> NvmlProbe | NoGpuProbe:
    """'auto' (NVML when it initialises) or 'none'."""
    if spec == "none":
        return NoGpuProbe("GPU verification switched off (--gpu-probe none)")
    if spec != "auto":
        return NoGpuProbe(f"unknown GPU probe {spec!r}: VRAM not verified")
    return open_nvml_probe(env)
