"""The test's own NVML view of the GPUs, independent of the supervisor's: every GPU test
checks with it that the memory came back."""

from __future__ import annotations

from tests.helpers import poll, wait_until

MIB = 1024 * 1024
ALLOC_MIB = 2048  # FAKE_VLLM_CUDA_MIB per worker
TOLERANCE_MIB = 256  # "back at baseline" means within this


def _str(v) -> str:
    return v.decode() if isinstance(v, bytes) else v


class Gpus:
    """The test's own NVML view of every GPU (by NVML index)."""

    def __init__(self):
        import pynvml

        pynvml.nvmlInit()
        self.nv = pynvml
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i)
                        for i in range(pynvml.nvmlDeviceGetCount())]
        self.uuids = [_str(pynvml.nvmlDeviceGetUUID(h)) for h in self.handles]
        self.idle = self.used()

    @property
    def count(self) -> int:
        return len(self.handles)

    def used(self) -> list[float]:
        """MiB in use on each GPU now."""
        return [self.nv.nvmlDeviceGetMemoryInfo(h).used / MIB for h in self.handles]

    def pids(self) -> set[int]:
        """Every PID NVML lists on any GPU (compute or graphics)."""
        out = set()
        for h in self.handles:
            for fn in (self.nv.nvmlDeviceGetComputeRunningProcesses,
                       self.nv.nvmlDeviceGetGraphicsRunningProcesses):
                try:
                    out.update(p.pid for p in fn(h))
                except self.nv.NVMLError:
                    pass
        return out

    def baseline(self) -> list[float]:
        """Usage before a launch: first wait (up to 20 s) for what an earlier test freed to
        come back to the idle level seen at the start, then the median of three reads."""
        # Somebody else's job may hold memory for good: then go on after 20 s all the same.
        poll(lambda: all(u - i <= TOLERANCE_MIB for u, i in zip(self.used(), self.idle)),
             20, interval=0.2)
        reads = [self.used() for _ in range(3)]
        return [sorted(col)[1] for col in zip(*reads)]

    def deltas(self, base: list[float]) -> list[float]:
        return [u - b for u, b in zip(self.used(), base)]

    def assert_held(self, base: list[float], per_gpu: dict[int, int] | None = None,
                    workers: int = 1) -> None:
        """The workers' memory shows in NVML: ``per_gpu`` maps NVML index -> workers on it;
        without it, the ``workers`` allocations may sit on any GPUs (CUDA ordinals need not
        be NVML indices)."""
        d = self.deltas(base)
        if per_gpu is not None:
            for i, n in per_gpu.items():
                assert d[i] >= n * ALLOC_MIB, f"GPU {i}: +{d[i]:.0f} MiB, expected >= " \
                                              f"{n * ALLOC_MIB} MiB; all deltas {d}"
            for i in set(range(self.count)) - set(per_gpu):
                assert d[i] < TOLERANCE_MIB, f"GPU {i} should be untouched; deltas {d}"
        else:
            assert sum(d) >= workers * ALLOC_MIB, f"deltas {d} for {workers} worker(s)"

    def assert_back(self, base: list[float], timeout: float = 10.0) -> None:
        """Every GPU within TOLERANCE_MIB of ``base`` (waiting up to ``timeout``)."""
        def back():
            return all(x <= TOLERANCE_MIB for x in self.deltas(base))

        def why():
            return (f"NVML to show every GPU back at baseline: deltas MiB "
                    f"{[round(x) for x in self.deltas(base)]}, base {base}, "
                    f"NVML pids {sorted(self.pids())}")
        wait_until(back, timeout, why)
