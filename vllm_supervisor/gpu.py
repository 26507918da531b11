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
    """Baseline, samples while serving, and the final check after the tree is gone.

    GPUs are keyed by UUID (a MIG instance by its own UUID), never by position."""

    def __init__(self, probe: GpuProbe, tolerance_mib: float):
        self.probe = probe
        self.tolerance_mib = tolerance_mib
        self.unavailable = probe.available()
        self.baseline: dict[str, float | None] = {}
        self.index: dict[str, int] = {}
        self.used_by_tree: set[str] = set()  # GPUs where a tree PID was seen
        self.rose: set[str] = set()  # GPUs that went over baseline + tolerance while we ran
        self.peak: dict[tuple[int, str], float] = {}  # (pid, uuid) -> MiB
        self.names: dict[int, str] = {}

    def take_baseline(self) -> None:
        """Read every in-scope GPU before launch."""
        if self.unavailable:
            return
        for r in self.probe.read():
            self.baseline[r.uuid] = r.used_mib
            self.index[r.uuid] = r.index

    def sample(self, tree: dict[int, str], serving: bool = True) -> list[GpuReading]:
        """Note which tree processes (pid -> title) hold memory where. While SERVING, a GPU
        over its baseline whose holders include PIDs that match nothing here (another PID
        namespace: a container without --pid=host) joins the GPUs judged at the stop."""
        if self.unavailable:
            return []
        readings = self.probe.read()
        for r in readings:
            self.index.setdefault(r.uuid, r.index)
            base = self.baseline.get(r.uuid)
            if serving and r.used_mib is not None and base is not None \
                    and r.used_mib - base > self.tolerance_mib \
                    and any(read_proc(pid) is None for pid, _ in r.procs):
                self.rose.add(r.uuid)
            for pid, mib in r.procs:
                if pid in tree:
                    self.used_by_tree.add(r.uuid)
                    self.names[pid] = tree[pid]
                    key = (pid, r.uuid)
                    self.peak[key] = max(self.peak.get(key, 0.0), mib or 0.0)
        return readings

    def check(self, tree: dict[int, str]) -> tuple[bool, VramVerdict]:
        """(done, verdict) now: done when released, or when no better evidence can come."""
        if self.unavailable:
            return True, VramVerdict("unavailable", f"VRAM not verified: {self.unavailable}")
        readings = self.sample(tree, serving=False)
        per_gpu = tuple(self._gpu_row(r) for r in readings)
        scope = [r for r in readings if r.uuid in self.used_by_tree | self.rose]
        ours = [GpuUse(r.index, r.uuid, pid, mib, True, tree[pid], _user(pid))
                for r in scope for pid, mib in r.procs if pid in tree]
        if ours:
            return False, VramVerdict("held", "processes of the tree still hold GPU memory",
                                      holders=tuple(ours), per_gpu=per_gpu)
        over = [r for r in scope if r.used_mib is not None
                and self.baseline.get(r.uuid) is not None
                and r.used_mib - self.baseline[r.uuid] > self.tolerance_mib]
        if over:
            holders = tuple(self._holders(over, tree))
            visible = any(h.name != NOT_VISIBLE for h in holders)
            status = "held" if visible or not holders else "unattributable"
            return False, VramVerdict(status, self._over_text(over, holders), holders=holders,
                                      per_gpu=per_gpu)
        unknown = [r for r in scope if r.used_mib is None or self.baseline.get(r.uuid) is None]
        if unknown:
            why = "; ".join(f"GPU {r.index}: memory reads N/A" + (f" ({r.error})" if r.error
                            else "") for r in unknown)
            return True, VramVerdict("unattributable", f"no process of the tree is listed any "
                                     f"more, but memory cannot be compared ({why})",
                                     per_gpu=per_gpu)
        return True, VramVerdict("released", self._released_text(scope), per_gpu=per_gpu)

    def progress(self, readings_verdict: VramVerdict) -> str:
        """GiB over baseline per GPU, for the live status line."""
        parts = []
        for row in readings_verdict.per_gpu:
            if row["uuid"] in self.used_by_tree | self.rose and row["used_mib"] is not None \
                    and row["baseline_mib"] is not None:
                over = max(0.0, row["used_mib"] - row["baseline_mib"]) / 1024
                parts.append(f"GPU {row['gpu']} {over:.2f} GiB over baseline")
        return ", ".join(parts) or readings_verdict.detail

    def _released_text(self, scope: list[GpuReading]) -> str:
        if not scope:
            return "no process of the tree was seen holding GPU memory; GPUs at baseline"
        gpus = ", ".join(f"GPU {r.index}" for r in scope)
        return f"{gpus} back within {self.tolerance_mib:g} MiB of baseline"

    def _over_text(self, over: list[GpuReading], holders) -> str:
        parts = [f"GPU {r.index} +{r.used_mib - self.baseline[r.uuid]:.0f} MiB over baseline"
                 for r in over]
        who = "no process listed (stale CUDA IPC or driver-held memory?)" if not holders \
            else "held by processes outside the tree"
        return f"memory held after the tree is gone, {who}: " + "; ".join(parts)

    def _holders(self, over: list[GpuReading], tree: dict[int, str]) -> list[GpuUse]:
        out = []
        for r in over:
            for pid, mib in r.procs:
                info = read_proc(pid)
                out.append(GpuUse(r.index, r.uuid, pid, mib, pid in tree,
                                  info.title if info else NOT_VISIBLE, _user(pid)))
        return out

    def _gpu_row(self, r: GpuReading) -> dict:
        return {"gpu": r.index, "uuid": r.uuid, "baseline_mib": self.baseline.get(r.uuid),
                "used_mib": r.used_mib, "error": r.error}

    def peaks(self) -> tuple[dict, ...]:
        """Peak memory seen per (process, GPU)."""
        return tuple({"pid": pid, "gpu": self.index.get(uuid, -1), "uuid": uuid,
                      "peak_mib": mib, "title": self.names.get(pid, "")}
                     for (pid, uuid), mib in sorted(self.peak.items()))


NOT_VISIBLE = "(not visible here: another PID namespace?)"


def _user(pid: int) -> str:
    """The owner of PID, or '?' when it cannot be seen."""
    import pwd

    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    uid = int(line.split()[1])
                    try:
                        return pwd.getpwuid(uid).pw_name
                    except KeyError:
                        return str(uid)
    except OSError:
        pass
    return "?"


def make_probe(spec: str, env: dict[str, str]) -> GpuProbe:
    """'auto' (NVML when it initialises), 'none', or 'sim:DIR[:GPUS]' (simulated engine)."""
    if spec == "none":
        return NoGpuProbe("GPU verification switched off (--gpu-probe none)")
    if spec.startswith("sim:"):
        _, directory, *n = spec.split(":")
        return SimulatedGpuProbe(Path(directory), gpus=int(n[0]) if n else 2)
    from vllm_supervisor.nvml import open_nvml_probe

    return open_nvml_probe(env)
