"""The GPU layer: a probe protocol, a 'no GPU' probe that says why, a simulated GPU,
and the VRAM accounting that turns readings into a verdict. Unknown is never zero."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vllm_supervisor.proctree import read_proc
from vllm_supervisor.records import GpuUse, VramVerdict

MIB = 1024 * 1024


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one moment: memory in use and the processes NVML lists on it."""

    index: int
    uuid: str
    used_mib: float | None  # None: N/A (MIG) or the query failed
    total_mib: float | None
    procs: tuple[tuple[int, float | None], ...]  # (pid, MiB or None when N/A)
    error: str | None = None


class GpuProbe(Protocol):
    """What the supervisor needs from a GPU backend."""

    name: str

    def available(self) -> str | None:
        """None when usable, else why not (one line)."""

    def read(self) -> list[GpuReading]:
        """Every in-scope GPU now."""


class NoGpuProbe:
    """No GPU to verify: the stop completes and the report says VRAM was not verified."""

    name = "none"

    def __init__(self, why: str):
        self.why = why

    def available(self) -> str | None:
        """Always unavailable, with the reason given."""
        return self.why

    def read(self) -> list[GpuReading]:
        """Nothing to read."""
        return []


class SimulatedGpuProbe:
    """The simulated engine's VRAM: alloc-*.json files its workers write, freed when the
    writing process is gone (as the driver frees memory at process exit), optionally late."""

    name = "simulated"

    def __init__(self, directory: Path, gpus: int = 2, total_mib: float = 81559, base_mib=615):
        self.dir = Path(directory)
        self.gpus = gpus
        self.total_mib = total_mib
        self.base_mib = base_mib
        self._dead_since: dict[str, float] = {}

    def available(self) -> str | None:
        """Usable while its directory exists."""
        return None if self.dir.is_dir() else f"simulated GPU directory {self.dir} is missing"

    def read(self) -> list[GpuReading]:
        """Current simulated readings."""
        used = [float(self.base_mib)] * self.gpus
        procs: list[list[tuple[int, float | None]]] = [[] for _ in range(self.gpus)]
        for path in sorted(self.dir.glob("alloc-*.json")):
            try:
                a = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            gpu = int(a["gpu"]) % self.gpus
            if not self._holds(path.name, a):
                continue
            used[gpu] += a["mib"]
            if a.get("pid") is not None:
                procs[gpu].append((int(a["pid"]), float(a["mib"])))
        return [
            GpuReading(i, f"GPU-simulated-{i:04d}", used[i], self.total_mib, tuple(procs[i]))
            for i in range(self.gpus)
        ]

    def _holds(self, key: str, alloc: dict) -> bool:
        pid = alloc.get("pid")
        if pid is None:
            return True  # memory with no owner process, like a stale CUDA IPC reference
        info = read_proc(int(pid))
        alive = info is not None and abs(info.create_time - alloc["create_time"]) < 0.05
        if alive and info.state != "Z":
            return True
        since = self._dead_since.setdefault(key, time.monotonic())
        return time.monotonic() - since < float(alloc.get("release_delay_s", 0))


class VramLedger:
    """Baseline, samples while serving, and the final check after the tree is gone."""

    def __init__(self, probe: GpuProbe, tolerance_mib: float):
        self.probe = probe
        self.tolerance_mib = tolerance_mib
        self.unavailable = probe.available()
        self.baseline: dict[int, float | None] = {}
        self.uuids: dict[int, str] = {}
        self.used_by_tree: set[int] = set()
        self.peak: dict[tuple[int, int], float] = {}  # (pid, gpu) -> MiB
        self.names: dict[int, str] = {}

    def take_baseline(self) -> None:
        """Read every GPU before launch."""
        if self.unavailable:
            return
        for r in self.probe.read():
            self.baseline[r.index] = r.used_mib
            self.uuids[r.index] = r.uuid

    def sample(self, tree: dict[int, str]) -> list[GpuReading]:
        """Note which tree processes (pid -> title) hold memory where."""
        if self.unavailable:
            return []
        readings = self.probe.read()
        for r in readings:
            for pid, mib in r.procs:
                if pid in tree:
                    self.used_by_tree.add(r.index)
                    self.names[pid] = tree[pid]
                    key = (pid, r.index)
                    self.peak[key] = max(self.peak.get(key, 0.0), mib or 0.0)
        return readings

    def check(self, tree: dict[int, str]) -> tuple[bool, VramVerdict]:
        """(done, verdict) for now: done when released, or when nothing better can come."""
        if self.unavailable:
            return True, VramVerdict("unavailable", f"VRAM not verified: {self.unavailable}")
        readings = self.sample(tree)
        holders, over, unknown = [], [], []
        for r in readings:
            if r.index not in self.used_by_tree and r.index not in self.baseline:
                continue
            for pid, mib in r.procs:
                if pid in tree:
                    holders.append(GpuUse(r.index, r.uuid, pid, mib, True, tree[pid]))
            base = self.baseline.get(r.index)
            if r.used_mib is None or base is None:
                unknown.append(r)
            elif r.index in self.used_by_tree and r.used_mib - base > self.tolerance_mib:
                over.append(r)
        per_gpu = tuple(self._gpu_row(r) for r in readings)
        if not holders and not over and not unknown:
            return True, VramVerdict("released", self._released_text(), per_gpu=per_gpu)
        if holders:
            return False, VramVerdict("held", "tree processes still hold memory", 0.0,
                                      tuple(holders), per_gpu)
        if over:
            return False, VramVerdict("held", self._over_text(over), 0.0,
                                      tuple(self._all_holders(over, tree)), per_gpu)
        return False, VramVerdict("unattributable", "memory reads N/A on "
                                  + ", ".join(f"GPU {r.index}" for r in unknown), 0.0, (), per_gpu)

    def _released_text(self) -> str:
        if not self.used_by_tree:
            return "no process of the tree was seen holding GPU memory; GPUs at baseline"
        gpus = ", ".join(f"GPU {i}" for i in sorted(self.used_by_tree))
        return f"{gpus} back within {self.tolerance_mib:g} MiB of baseline"

    def _over_text(self, over: list[GpuReading]) -> str:
        parts = [f"GPU {r.index} +{r.used_mib - self.baseline[r.index]:.0f} MiB over baseline"
                 for r in over]
        return "memory held after the tree is gone: " + "; ".join(parts)

    def _all_holders(self, over: list[GpuReading], tree: dict[int, str]) -> list[GpuUse]:
        out = []
        for r in over:
            for pid, mib in r.procs:
                info = read_proc(pid)
                out.append(GpuUse(r.index, r.uuid, pid, mib, pid in tree,
                                  info.title if info else "(not visible here)"))
        return out

    def _gpu_row(self, r: GpuReading) -> dict:
        return {"gpu": r.index, "uuid": r.uuid, "baseline_mib": self.baseline.get(r.index),
                "used_mib": r.used_mib, "error": r.error}

    def peaks(self) -> tuple[dict, ...]:
        """Peak memory seen per (process, GPU)."""
        return tuple({"pid": pid, "gpu": gpu, "peak_mib": mib, "title": self.names.get(pid, "")}
                     for (pid, gpu), mib in sorted(self.peak.items()))


def make_probe(spec: str) -> GpuProbe:
    """'auto' (NVML when it initialises), 'none', or 'sim:DIR[:GPUS]' (simulated engine)."""
    if spec == "none":
        return NoGpuProbe("GPU verification switched off (--gpu-probe none)")
    if spec.startswith("sim:"):
        _, directory, *n = spec.split(":")
        return SimulatedGpuProbe(Path(directory), gpus=int(n[0]) if n else 2)
    from vllm_supervisor.nvml import open_nvml_probe

    return open_nvml_probe()
