#!/usr/bin/env python3
"""GPU memory release after SIGKILL: the supervisor's verdict against an NVML observer.

When does the supervisor say "released", and when does an independent NVML observer see
it? Runs on a GPU machine (scripts/gpu_verify.sh runs it).

Each run: an observer subprocess polls nvmlDeviceGetMemoryInfo(GPU).used every --poll-ms and
logs "monotonic_time used_mib"; the supervisor (--gpu-probe auto, --grace 0.3) runs the
simulated vLLM with tp 1 holding SIZE GiB of real CUDA memory in one tensor
(FAKE_VLLM_CUDA_MIB) and an engine deaf to SIGTERM (FAKE_VLLM_MISBEHAVE=engine-ignores-term),
so the stop always ends in SIGKILL. After ready the bench SIGTERMs the supervisor and reads:

  t_kill = t0_monotonic + t of the first SIGKILL sent        (the report)
  t_sup  = t0_monotonic + vram.released_t                    (the report)
  t_obs  = first observer sample >= t_kill with used <= baseline + tolerance
           (baseline: the observer's median before launch)

and reports per size the median and max of t_sup - t_kill and t_obs - t_kill, and the
ratio of the medians (target <= 1.15). Runs are interleaved over the sizes, so a --budget-s
cut leaves every size with some runs.

  python scripts/bench_gpu.py [--sizes 2,20,60] [--runs 10] [--json OUT] [--budget-s S]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
TARGET_RATIO = 1.15

OBSERVER = r"""
import os, select, sys, time
import pynvml
path, index, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
pynvml.nvmlInit()
h = pynvml.nvmlDeviceGetHandleByIndex(index)
mono, info = time.monotonic, pynvml.nvmlDeviceGetMemoryInfo
procs = pynvml.nvmlDeviceGetComputeRunningProcesses
first = True
with open(path, "w", buffering=1 << 20) as f:
    while True:
        a = mono()
        used = info(h).used
        b = mono()
        n = len(procs(h))  # a second column: processes NVML still lists
        f.write("%.6f %.1f %d\n" % ((a + b) / 2, used / 1048576, n))
        if first:
            first = False
            sys.stdout.write("ok\n")
            sys.stdout.flush()
        if select.select([0], [], [], interval)[0] and not os.read(0, 4096):
            break  # EOF on stdin: told to stop
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Observer:
    """The independent NVML poller (a subprocess); stops at EOF on its stdin."""

    def __init__(self, path: Path, gpu: int, interval_s: float):
        self.path = path
        self.proc = subprocess.Popen([sys.executable, "-c", OBSERVER, str(path), str(gpu),
                                     str(interval_s)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else b""
        if line.strip() != b"ok":
            self.stop()
            raise RuntimeError(f"NVML observer did not start: {self.proc.stderr.read()!r}")

    def stop(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child, by its Popen
            self.proc.wait()

    def samples(self) -> list[tuple[float, float]]:
        return [(t, u) for t, u, _ in self.samples3()]

    def samples3(self) -> list[tuple[float, float, int]]:
        """(time, MiB used, processes listed) per sample."""
        out = []
        for line in self.path.read_text().splitlines():
            try:
                t, used, n = line.split()
                out.append((float(t), float(used), int(n)))
            except ValueError:
                pass  # a last line cut short
        return out


class Supervised:
    """`python -m vllm_supervisor serve` over the simulated vLLM; stderr lines collected."""

    def __init__(self, tmp: Path, n: int, size_mib: int, args, env: dict):
        self.report = tmp / f"report-{n}.json"
        self.pidfile = tmp / f"pids-{n}.json"
        self.started_wall = time.time()
        env = dict(env, FAKE_VLLM_PIDFILE=str(self.pidfile), FAKE_VLLM_CUDA_MIB=str(size_mib))
        argv = [sys.executable, "-m", "vllm_supervisor", "serve", "--gpu-probe", "auto",
                "--grace", str(args.grace), "--report-json", str(self.report)]
        if args.vram_poll is not None:
            argv += ["--vram-poll", str(args.vram_poll)]
        argv += ["bench/gpu-model", "--port", str(free_port())]
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace"))

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any("ready: " in line for line in list(self.lines)):
                return
            if self.proc.poll() is not None:
                self.reader.join(5)  # the whole stderr, so the error says why it ended
                break
            time.sleep(0.01)
        raise RuntimeError(f"supervisor not ready (exit {self.proc.poll()}); stderr tail:\n"
                           + "".join(self.lines[-30:]))

    def cleanup(self) -> None:
        """Our own processes only: the supervisor by its Popen, then every pid its vLLM
        wrote to the pidfile, if it is still that process (started after us)."""
        import psutil

        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        pids = []
        try:
            for value in json.loads(self.pidfile.read_text()).values():
                pids += value if isinstance(value, list) else [value]
        except (OSError, ValueError):
            pass
        for pid in pids:
            try:
                p = psutil.Process(pid)
                if p.create_time() >= self.started_wall - 1:
                    p.kill()
            except psutil.Error:
                pass
        self.reader.join(5)


def one_run(tmp: Path, n: int, size_gib: float, args, env: dict, nv, handle) -> dict:
    size_mib = int(size_gib * 1024)
    row: dict = {"size_gib": size_gib, "run": n}
    pre_mib = nv.nvmlDeviceGetMemoryInfo(handle).used / MIB
    try:
        obs = Observer(tmp / f"observer-{n}.txt", args.gpu, args.poll_ms / 1000)
    except RuntimeError as exc:
        row["error"] = str(exc)
        return row
    sup = None
    try:
        time.sleep(0.3)  # baseline samples
        t_launch = time.monotonic()
        sup = Supervised(tmp, n, size_mib, args, env)
        sup.wait_ready(args.ready_timeout)
        time.sleep(0.3)
        sup.proc.send_signal(signal.SIGTERM)
        row["exit_code"] = sup.proc.wait(240)
        time.sleep(0.3)  # the observer's tail after the supervisor's verdict
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        row["error"] = str(exc)[-2000:]
    finally:
        obs.stop()
        if sup is not None:
            sup.cleanup()
        _wait_back(nv, handle, pre_mib + args.tolerance_mib, 30)  # before the next baseline
    if sup is None or "error" in row:
        return row
    try:
        rep = json.loads(sup.report.read_text())
    except (OSError, ValueError) as exc:
        row["error"] = f"no report: {exc}"
        return row
    samples = obs.samples()
    t0 = rep["t0_monotonic"]
    vram = rep["vram"]
    row.update(vram_status=vram["status"], vram_detail=vram["detail"])
    kills = [s for s in rep["signals"] if s["direction"] == "sent" and s["signal"] == "SIGKILL"]
    before = [u for t, u in samples if t < t_launch]
    if not kills or not before:
        row["error"] = "no SIGKILL in the report" if not kills else "no baseline samples"
        return row
    t_kill = t0 + kills[0]["t"]
    baseline = statistics.median(before)
    held = [u for t, u in samples if t_launch <= t <= t_kill]
    t_obs = next((t for t, u in samples if t >= t_kill and u <= baseline + args.tolerance_mib),
                 None)
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(samples)]
    row.update(
        baseline_mib=round(baseline, 1),
        held_over_baseline_mib=round(max(held) - baseline, 1) if held else None,
        observer_samples=len(samples),
        observer_gap_median_ms=round(1000 * statistics.median(gaps), 3) if gaps else None,
        sup_s=None if vram["released_t"] is None else round(t0 + vram["released_t"] - t_kill, 4),
        obs_s=None if t_obs is None else round(t_obs - t_kill, 4),
        # where the supervisor's time goes: SIGKILL -> tree reaped -> VRAM seen released
        gone_s=None if rep.get("tree_gone_t") is None
        else round(t0 + rep["tree_gone_t"] - t_kill, 4),
    )
    # The observer's view of both of the supervisor's conditions: memory back AND no
    # process listed any more on the GPU.
    t_both = next((t for t, u, n in obs.samples3()
                   if t >= t_kill and u <= baseline + args.tolerance_mib and n == 0), None)
    row["obs_procs_s"] = None if t_both is None else round(t_both - t_kill, 4)
    if not held or max(held) - baseline < 0.95 * size_mib:
        row["error"] = f"the observer never saw {size_mib} MiB held (max over baseline " \
                       f"{row['held_over_baseline_mib']} MiB)"
    return row


def _wait_back(nv, handle, limit_mib: float, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if nv.nvmlDeviceGetMemoryInfo(handle).used / MIB <= limit_mib:
            return
        time.sleep(0.05)


def summarize(rows: list[dict], sizes: list[float]) -> dict:
    out = {}
    for size in sizes:
        mine = [r for r in rows if r["size_gib"] == size]
        ok = [r for r in mine if "error" not in r and r.get("sup_s") is not None
              and r.get("obs_s") is not None]
        s = {"runs": len(mine), "valid": len(ok),
             "exit_codes": sorted({r.get("exit_code") for r in mine if "exit_code" in r}),
             "vram_status": sorted({r.get("vram_status") for r in mine if "vram_status" in r}),
             "errors": [r["error"] for r in mine if "error" in r]}
        if ok:
            sup = [r["sup_s"] for r in ok]
            obs = [r["obs_s"] for r in ok]
            s.update(sup_median_s=statistics.median(sup), sup_max_s=max(sup),
                     obs_median_s=statistics.median(obs), obs_max_s=max(obs),
                     lag_median_ms=1000 * statistics.median(a - b for a, b in zip(sup, obs)))
            m_obs = s["obs_median_s"]
            s["ratio_of_medians"] = s["sup_median_s"] / m_obs if m_obs > 0 else None
            s["meets_target"] = s["ratio_of_medians"] is not None and \
                s["ratio_of_medians"] <= TARGET_RATIO
        out[f"{size:g}"] = s
    return out


def print_table(summary: dict) -> None:
    print(f"{'size':>6} {'valid':>5}  {'sup med':>9} {'sup max':>9}  {'obs med':>9} "
          f"{'obs max':>9}  {'ratio':>6}  target <= {TARGET_RATIO}")
    for size, s in summary.items():
        if not s["valid"]:
            print(f"{size + ' GiB':>6} {0:>5}  no valid run: {s['errors'][:1]}")
            continue
        ms = {k: f"{1000 * s[k]:7.1f}ms" for k in ("sup_median_s", "sup_max_s",
                                                    "obs_median_s", "obs_max_s")}
        ratio = s["ratio_of_medians"]
        print(f"{size + ' GiB':>6} {s['valid']:>3}/{s['runs']:<1}  {ms['sup_median_s']} "
              f"{ms['sup_max_s']}  {ms['obs_median_s']} {ms['obs_max_s']}  "
              f"{'-' if ratio is None else f'{ratio:6.3f}'}  "
              f"{'met' if s['meets_target'] else 'MISSED'}")
    print("sup: supervisor's released_t - its first SIGKILL; obs: first NVML observer sample "
          "back at baseline - that SIGKILL")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--sizes", default="2,20,60", help="GiB per run, comma list (2,20,60)")
    ap.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_RUNS") or 10),
                    help="runs per size (env BENCH_RUNS; 10)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("BENCH_BUDGET_S")
                                                             or 0),
                    help="start no run that would end past this many seconds (0: no limit)")
    ap.add_argument("--gpu", type=int, default=0, help="NVML index of the GPU to use (0)")
    ap.add_argument("--grace", type=float, default=0.3, help="supervisor --grace (0.3)")
    ap.add_argument("--poll-ms", type=float, default=2.0, help="observer poll interval (2)")
    ap.add_argument("--tolerance-mib", type=float, default=256.0,
                    help="back at baseline within this (256, as the supervisor)")
    ap.add_argument("--vram-poll", type=float, default=None,
                    help="pass --vram-poll to the supervisor (default: its own)")
    ap.add_argument("--ready-timeout", type=float, default=240.0)
    a = ap.parse_args()
    sizes = [float(x) for x in a.sizes.split(",") if x.strip()]

    try:
        import pynvml as nv

        nv.nvmlInit()
        handle = nv.nvmlDeviceGetHandleByIndex(a.gpu)
    except Exception as exc:  # noqa: BLE001 - ImportError, NVMLError
        print(f"bench_gpu: NVML unavailable: {exc}", file=sys.stderr)
        return 2
    uuid = nv.nvmlDeviceGetUUID(handle)
    uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
    name = nv.nvmlDeviceGetName(handle)
    name = name.decode() if isinstance(name, bytes) else name
    mem = nv.nvmlDeviceGetMemoryInfo(handle)
    total_mib, used_mib = mem.total / MIB, mem.used / MIB
    skipped = {}
    for size in sizes:
        if size * 1024 + used_mib + 2048 > total_mib:  # + CUDA context and headroom
            skipped[f"{size:g}"] = f"{size:g} GiB does not fit: {total_mib:.0f} MiB total, " \
                                   f"{used_mib:.0f} MiB in use"
    todo = [s for s in sizes if f"{s:g}" not in skipped]

    results = {"device": name, "gpu": a.gpu, "uuid": uuid, "total_mib": round(total_mib),
               "driver": _str(nv.nvmlSystemGetDriverVersion()), "grace_s": a.grace,
               "poll_ms": a.poll_ms, "tolerance_mib": a.tolerance_mib,
               "vram_poll_s": a.vram_poll, "runs_requested": a.runs, "sizes_gib": sizes,
               "skipped": skipped, "target_ratio": TARGET_RATIO,
               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    rows: list[dict] = []
    start, cut = time.monotonic(), False
    with tempfile.TemporaryDirectory(prefix="vllm-supervise-bench-gpu-") as d:
        tmp = Path(d)
        bindir = tmp / "bin"
        bindir.mkdir()
        shim = bindir / "vllm"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m vllm_supervisor.sim "$@"\n')
        shim.chmod(0o755)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_VLLM_")}
        env.update(PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}",
                   PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
                   CUDA_VISIBLE_DEVICES=uuid,  # cuda:0 in the worker is the observed GPU
                   FAKE_VLLM_STARTUP_S="0.1", FAKE_VLLM_MISBEHAVE="engine-ignores-term",
                   VLLM_SUPERVISE_STATE_DIR=str(tmp / "state"))
        env.pop("VLLM_SUPERVISE_VLLM_BIN", None)
        longest, n = 0.0, 0
        for run in range(a.runs):
            for size in todo:
                elapsed = time.monotonic() - start
                if a.budget_s and elapsed + 1.2 * longest > a.budget_s:
                    cut = True
                    break
                t = time.monotonic()
                row = one_run(tmp, n, size, a, env, nv, handle)
                n += 1
                longest = max(longest, time.monotonic() - t)
                rows.append(row)
                print(f"run {run + 1}/{a.runs} {size:g} GiB: " + json.dumps(
                    {k: v for k, v in row.items() if k not in ("size_gib", "run")}), flush=True)
            if cut:
                print(f"bench_gpu: budget of {a.budget_s:g} s reached after {n} runs",
                      flush=True)
                break
    summary = summarize(rows, todo)
    results.update(elapsed_s=round(time.monotonic() - start, 1), budget_cut=cut,
                   summary=summary, runs=rows)
    print_table(summary)
    for size, why in skipped.items():
        print(f"{size} GiB skipped: {why}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if todo and all(s["valid"] for s in summary.values()) else 1


def _str(v) -> str:
    return v.decode() if isinstance(v, bytes) else v


if __name__ == "__main__":
    sys.exit(main())
