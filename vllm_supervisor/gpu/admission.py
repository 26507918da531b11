"""Admission to GPUs, decided (no I/O): a start goes ahead only when, on each of its GPUs,
the live reservations plus its own stay within the whole GPU, no other instance is still
loading there (vLLM sizes its cache from the free memory it sees while it loads), and
NVML shows the memory it will take actually free."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_supervisor.gpu.entries import LOADING, Entry
from vllm_supervisor.gpu.probe import GpuReading

EPSILON = 1e-6  # sums of fractions round: 0.33 + 0.56 + 0.11 is 1.0000000000000002


@dataclass(frozen=True)
class Wanted:
    """What a start needs: FRACTION of each of these GPUs (readings, in vLLM's order)."""

    gpus: tuple[GpuReading, ...]
    fraction: float


def blockers(want: Wanted, entries: list[Entry], now: dict[str, GpuReading],
             ignore: frozenset[str] = frozenset(), physical: bool = True) -> list[str]:
    """Why WANT cannot start now, one line per GPU that stops it ([] = admitted).
    ENTRIES: the table's counting entries; NOW: current readings by UUID; IGNORE: entry
    ids not counted (our own, and the one a --replace takes over); PHYSICAL: also check
    NVML's free memory (a --replace reserves before the old instance has let go)."""
    out = []
    for g in want.gpus:
        # An entry that cannot be read (no shares) while its owner holds its lock counts
        # as the whole of every GPU: unknown is never zero.
        others = [e for e in entries if (g.uuid in e.shares or not e.shares)
                  and e.id not in ignore]
        why = []
        reserved = sum(e.shares[g.uuid].fraction if g.uuid in e.shares else 1.0
                       for e in others)
        if reserved + want.fraction > 1 + EPSILON:
            why.append(f"{reserved:.2f} reserved + {want.fraction:.2f} needed > 1.00")
        loading = [e for e in others if e.state == LOADING]
        if loading and not why:
            why.append("another instance is loading (two loads never overlap on a GPU)")
        r = now.get(g.uuid)
        if physical and not why and r is not None:
            why += _physical(r, want.fraction)
        if why:
            held = "; ".join(e.describe(g.uuid) for e in others) or "no reservation"
            out.append(f"GPU {g.index}: {', '.join(why)} [{held}]")
    return out


def _physical(r: GpuReading, fraction: float) -> list[str]:
    if r.used_mib is None or r.total_mib is None:
        return []  # N/A (MIG): the reservations alone decide, and the start says so
    need = fraction * r.total_mib
    free = r.total_mib - r.used_mib
    if free >= need:
        return []
    pids = " ".join(str(pid) for pid, _ in r.procs) or "no process listed"
    return [(f"NVML shows {free / 1024:.1f} GiB free, {need / 1024:.1f} GiB needed "
            f"(held by pids {pids})")]


def shares_of(want: Wanted, unlisted) -> dict[str, dict]:
    """The entry's "gpus" field for WANT; UNLISTED(reading) -> MiB no process lists."""
    return {g.uuid: {"index": g.index, "fraction": want.fraction,
                     "total_mib": g.total_mib or 0.0, "unlisted_mib": unlisted(g)}
            for g in want.gpus}
