"""The VRAM ledger: baseline before launch, samples while serving, the verdict after
the tree is gone. GPUs are keyed by UUID; unknown is never zero."""

from __future__ import annotations

from vllm_supervisor.gpu.probe import GpuProbe, GpuReading, unlisted_mib
from vllm_supervisor.gpu.verdict import GpuUse, VramVerdict
from vllm_supervisor.host.proctree import read_proc, user_of


class VramLedger:
    """Baseline, samples while serving, and the final check after the tree is gone.

    GPUs are keyed by UUID (a MIG instance by its own UUID), never by position."""

    def __init__(self, probe: GpuProbe, tolerance_mib: float, lookup=read_proc,
                 user_of=user_of):
        self.probe = probe
        self._lookup = lookup  # pid -> ProcInfo or None (a fake in unit tests)
        self._user_of = user_of
        self.tolerance_mib = tolerance_mib
        self.unavailable = probe.available()
        self.baseline: dict[str, float | None] = {}
        self.unlisted: dict[str, float | None] = {}  # memory no process listed, at baseline
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
            self.unlisted[r.uuid] = unlisted_mib(r)
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
                    and any(self._lookup(pid) is None for pid, _ in r.procs):
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
        ours = [GpuUse(r.index, r.uuid, pid, mib, True, tree[pid], self._user_of(pid))
                for r in scope for pid, mib in r.procs if pid in tree]
        if ours:
            return False, VramVerdict("held", "processes of the tree still hold GPU memory",
                                      holders=tuple(ours), per_gpu=per_gpu)
        over = [r for r in scope if self._over(r)]
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

    def _over(self, r: GpuReading) -> bool:
        """Whether R holds more than before launch that is not another tenant's. When
        NVML lists every process with its memory and each is visible here, only memory no
        process lists counts (a co-tenant that grew meanwhile is not ours); otherwise the
        total against the baseline (a co-tenant's growth then keeps us waiting: never a
        false "released")."""
        now, base = unlisted_mib(r), self.unlisted.get(r.uuid)
        if now is not None and base is not None \
                and all(self._lookup(pid) is not None for pid, _ in r.procs):
            return now - base > self.tolerance_mib
        base = self.baseline.get(r.uuid)
        return r.used_mib is not None and base is not None \
            and r.used_mib - base > self.tolerance_mib

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
                info = self._lookup(pid)
                out.append(GpuUse(r.index, r.uuid, pid, mib, pid in tree,
                                  info.title if info else NOT_VISIBLE, self._user_of(pid)))
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
