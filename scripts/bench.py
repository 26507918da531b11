#!/usr/bin/env python3
"""Benchmarks for the supervised lifecycle, measured in one run, reported as figures and
ratios (docs/benchmarks.md records runs). CPU-only: uses the simulated vLLM. Figures are
printed, never asserted: the exit code says only whether the benchmark itself worked.

  python scripts/bench.py [--quick] [--runs N] [--idle S] [--lines N] [--log-reps N]
                          [--long-line-mib N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
# A copy of an older tree (before the package became folders) runs this script too, for
# before/after figures: its modules had other names.
_FOLDERS = (REPO / "vllm_supervisor" / "host").is_dir()
SIM_MODULE = "vllm_supervisor.sim" if _FOLDERS else "vllm_supervisor.simulated"
LOG_MODULES = (("vllm_supervisor.host.logs", "vllm_supervisor.lifecycle.logclass") if _FOLDERS
               else ("vllm_supervisor.logs", "vllm_supervisor.logclass"))
SIM = [sys.executable, "-m", SIM_MODULE]
SCRAPE_S = 5.0  # the idle figure with metrics: a scrape this often (Prometheus' default: 60 s)
FULL = {"runs": 20, "idle": 60.0, "lines": 1_000_000, "log_reps": 5, "long_line_mib": 100}
QUICK = {"runs": 3, "idle": 3.0, "lines": 200_000, "log_reps": 2, "long_line_mib": 20}


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_env(tmp: Path, **extra) -> dict:
    """Environment that makes `vllm` the simulated vLLM of this tree."""
    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    shim = bindir / "vllm"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {SIM_MODULE} "$@"\n')
    shim.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", FAKE_VLLM_STARTUP_S="0.2",
               PYTHONPATH=str(REPO), VLLM_SUPERVISE_STATE_DIR=str(tmp / "state"))
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Sup:
    """A supervisor subprocess whose stderr lines are timestamped on arrival."""

    def __init__(self, tmp: Path, sup_args: list[str], env: dict, stdout=subprocess.DEVNULL,
                 vllm_args: tuple[str, ...] = ()):
        self.report = tmp / f"report-{time.monotonic_ns()}.json"
        self.pidfile = tmp / f"pids-{time.monotonic_ns()}.json"
        env = dict(env, FAKE_VLLM_PIDFILE=str(self.pidfile))
        argv = [sys.executable, "-m", "vllm_supervisor", "serve", "--gpu-probe", "none",
                "--report-json", str(self.report), *sup_args, "bench/model",
                "--port", str(free_port()), *vllm_args]
        self.proc = subprocess.Popen(argv, env=env, stdout=stdout, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for raw in self.proc.stderr:
            self.lines.append((time.monotonic(), raw.decode(errors="replace")))

    def wait_for(self, text: str, timeout: float = 60) -> float:
        """When a stderr line containing TEXT arrived (waits for it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, line in list(self.lines):
                if text in line:
                    return t
            if self.proc.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.005)
        raise RuntimeError(f"{text!r} not seen on the supervisor's stderr")

    def pids(self) -> dict:
        """The simulated tree's pids, from its pidfile."""
        for _ in range(2000):
            try:
                return json.loads(self.pidfile.read_text())
            except (OSError, ValueError):
                time.sleep(0.01)
        raise RuntimeError("no pidfile")

    def finish(self) -> dict:
        """Reap the supervisor; its JSON report."""
        self.proc.wait(120)
        self.reader.join(5)
        return json.loads(self.report.read_text())


def bench_escalation(tmp: Path, runs: int, grace: float) -> dict:
    """SIGKILL time minus the grace, measured from the supervisor's own signal log."""
    env = fake_env(tmp, FAKE_VLLM_MISBEHAVE="engine-ignores-term")
    errs, observed = [], []
    for _ in range(runs):
        s = Sup(tmp, ["--grace", str(grace)], env)
        s.wait_for("ready: ")
        engine = os.pidfd_open(s.pids()["engine"])
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        select.select([engine], [], [], 30)
        observed.append((time.monotonic() - t0 - grace) * 1000)
        os.close(engine)
        rep = s.finish()
        sent = [x for x in rep["signals"] if x["direction"] == "sent"]
        t_term = next(x["t"] for x in sent if x["signal"] == "SIGTERM")
        t_kill = next(x["t"] for x in sent if x["signal"] == "SIGKILL")
        errs.append((t_kill - t_term - grace) * 1000)
    return {"runs": runs, "grace_s": grace, "median_ms": statistics.median(errs),
            "max_ms": max(errs), "min_ms": min(errs),
            # an independent observer: from our SIGTERM to the supervisor until the engine's
            # death is seen through a pidfd, minus the grace
            "observed_median_ms": statistics.median(observed),
            "observed_max_ms": max(observed)}


def _deaths(fds: list[int], timeout: float = 30) -> dict[int, float]:
    """When each pidfd turned readable (its process died), on CLOCK_MONOTONIC."""
    when: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while len(when) < len(fds) and time.monotonic() < deadline:
        ready, _, _ = select.select([f for f in fds if f not in when], [], [],
                                    max(0.0, deadline - time.monotonic()))
        now = time.monotonic()
        for fd in ready:
            when[fd] = now
    if len(when) < len(fds):
        raise RuntimeError("a process did not die within the timeout")
    return when


def _guard(sup_pid: int) -> psutil.Process | None:
    """The supervisor's death guard: its child of that title."""
    return next((c for c in psutil.Process(sup_pid).children()
                 if "death guard" in " ".join(c.cmdline())), None)


def bench_stop_latency(tmp: Path, runs: int, cuda_mib: int = 0,
                       tp: int = 1) -> tuple[dict, dict]:
    """From the last tree process's death (pidfds on every process of the simulated tree)
    to the stop report on the supervisor's stderr, and to the supervisor's own exit and its
    death guard's (pidfds on both). With CUDA_MIB, TP workers each hold that much real CUDA
    memory and the supervisor verifies its release through NVML (a GPU machine)."""
    env = fake_env(tmp, **({"FAKE_VLLM_CUDA_MIB": cuda_mib} if cuda_mib else {}))
    sup_args = ["--grace", "10"] + (["--gpu-probe", "auto"] if cuda_mib else [])
    to_report, to_exit, to_guard = [], [], []
    for _ in range(runs):
        s = Sup(tmp, sup_args, env, vllm_args=("--tensor-parallel-size", str(tp)))
        s.wait_for("ready: ")
        p = s.pids()
        tree = [os.pidfd_open(x) for x in [p["api"], p["engine"], *p["workers"], p["tracker"]]]
        sup = [os.pidfd_open(x.pid) for x in (s.proc, _guard(s.proc.pid)) if x]
        s.proc.send_signal(signal.SIGTERM)
        when = _deaths([*tree, *sup])
        last = max(when[fd] for fd in tree)
        t_report = s.wait_for("stop report")
        s.finish()
        for fd in [*tree, *sup]:
            os.close(fd)
        to_report.append((t_report - last) * 1000)
        to_exit.append((when[sup[0]] - last) * 1000)
        to_guard += [(when[fd] - last) * 1000 for fd in sup[1:]]
    exits = {"runs": runs, "median_ms": statistics.median(to_exit), "max_ms": max(to_exit),
             "min_ms": min(to_exit)}
    if to_guard:
        exits |= {"guard_median_ms": statistics.median(to_guard), "guard_max_ms": max(to_guard)}
    report = {"runs": runs, "median_ms": statistics.median(to_report), "max_ms": max(to_report)}
    return report, exits


def bench_idle(tmp: Path, seconds: float, metrics: bool = False) -> dict:
    """Supervisor and guard CPU (% of one core) and RSS while the simulated engine idles;
    with METRICS, the Prometheus endpoint is up (--metrics-port) and scraped every
    SCRAPE_S, as a Prometheus would (the scrapes' cost is in the figure)."""
    mport = free_port()
    s = Sup(tmp, ["--grace", "5", *(["--metrics-port", str(mport)] if metrics else [])],
            fake_env(tmp))
    s.wait_for("ready: ")
    time.sleep(1.0)
    sup, guard = psutil.Process(s.proc.pid), _guard(s.proc.pid)
    procs = [sup, guard] if guard else [sup]
    c0 = [sum(p.cpu_times()[:2]) for p in procs]
    t0 = time.monotonic()
    scrapes = 0
    while (left := t0 + seconds - time.monotonic()) > 0:
        if metrics:
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
                r.read()
            scrapes += 1
        time.sleep(min(left, SCRAPE_S))
    wall = time.monotonic() - t0
    cpu = [sum(p.cpu_times()[:2]) - c for p, c in zip(procs, c0, strict=True)]
    res = {"seconds": round(wall, 1), "supervisor_cpu_pct": 100 * cpu[0] / wall,
           "supervisor_rss_mib": sup.memory_info().rss / 2**20,
           "supervisor_uss_mib": sup.memory_full_info().uss / 2**20}
    if metrics:
        res["scrapes"] = scrapes
    if guard:
        res["guard_cpu_pct"] = 100 * cpu[1] / wall
        res["guard_uss_mib"] = guard.memory_full_info().uss / 2**20
    s.proc.send_signal(signal.SIGTERM)
    s.finish()
    return res


FLOOD = re.compile(r"log flood done: (\d+) lines in ([0-9.]+) s")


def _flood_direct(tmp: Path, env: dict) -> float:
    """The simulated API server's own time for the flood, its stdout a file."""
    with open(tmp / "direct.out", "wb") as f:
        p = subprocess.Popen([*SIM, "serve", "m", "--port", str(free_port())], env=env,
                             stdout=f, stderr=subprocess.PIPE, start_new_session=True)
        took = None
        for raw in p.stderr:
            m = FLOOD.search(raw.decode(errors="replace"))
            if m:
                took = float(m.group(2))
                break
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(30)
        p.stderr.close()
    if took is None:
        raise RuntimeError("the simulated vLLM did not report its flood")
    return took


def _flood_supervised(tmp: Path, env: dict) -> tuple[float, int, int]:
    """The same under the supervisor (stdout to a file, --log-file on, the classifier on);
    also how many flood lines reached the stdout file and the log file."""
    out, log = tmp / "supervised.out", tmp / "supervised.log"
    log.unlink(missing_ok=True)
    with open(out, "wb") as f:
        s = Sup(tmp, ["--grace", "5", "--log-file", str(log)], env, stdout=f)
        s.wait_for("log flood done")
        line = next(x for _, x in s.lines if "log flood done" in x)
        s.proc.send_signal(signal.SIGTERM)
        s.finish()
    lines = [f.read_bytes().count(b"log line ") for f in (out, log)]
    return float(FLOOD.search(line).group(2)), lines[0], lines[1]


def bench_logs(tmp: Path, lines: int, reps: int) -> dict:
    """The simulated API server's own time to write LINES lines: to a file directly, then
    through the supervisor with --log-file (alternating, REPS times each). Ratio = direct /
    supervised, of each mode's fastest run (the writer's own speed varies from run to run
    in both modes; the ratio of medians is reported too): 1.0 means the supervisor costs
    the writer nothing."""
    env = fake_env(tmp, FAKE_VLLM_LOG_LINES=lines)
    direct, supervised, counts = [], [], set()
    for _ in range(reps):
        direct.append(_flood_direct(tmp, env))
        took, n_out, n_log = _flood_supervised(tmp, env)
        supervised.append(took)
        counts.add((n_out, n_log))
    d, s = statistics.median(direct), statistics.median(supervised)
    # Every line must arrive in both places: a ratio of a lossy copy would mean nothing.
    complete = counts == {(lines, lines)}
    return {"lines": lines, "reps": reps, "ratio": min(direct) / min(supervised),
            "ratio_of_medians": d / s, "direct_best_s": min(direct),
            "supervised_best_s": min(supervised), "direct_median_s": d,
            "supervised_median_s": s, "direct_all_s": direct, "supervised_all_s": supervised,
            "all_lines_in_stdout_and_log_file": complete}


# One line of MIB MiB and no newline, fed in 64 KiB chunks (a pump's reads) to the log file and
# the classifier, then its newline; prints seconds and the peak of Python's allocations
# above the start in bytes (tracemalloc costs per allocation, and there are few here).
LONG_LINE = r"""
import importlib, sys, time, tracemalloc
mib, path, logs, logclass = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
lf = importlib.import_module(logs).LogFile(path)
clf = importlib.import_module(logclass).LogClassifier()
tracemalloc.start()
start = tracemalloc.get_traced_memory()[0]
t = time.perf_counter()
for _ in range(mib * 16):
    piece = b"x" * 65536  # a new buffer each time, as a pump's read returns
    lf.feed("stdout", piece)
    clf.feed("stdout", piece)
lf.feed("stdout", b"\n")
clf.feed("stdout", b"\n")
lf.close()
clf.flush()
print(time.perf_counter() - t, tracemalloc.get_traced_memory()[1] - start)
"""


def _long_line(tmp: Path, mib: int, timeout: float) -> dict:
    out = tmp / "long-line.log"
    out.unlink(missing_ok=True)
    argv = [sys.executable, "-c", LONG_LINE, str(mib), str(out), *LOG_MODULES]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=timeout,
                           env=dict(os.environ, PYTHONPATH=str(REPO)))
    except subprocess.TimeoutExpired:
        return {"mib": mib, "seconds": None, "note": f"not done in {timeout:g} s"}
    took, peak = p.stdout.split()
    whole = out.stat().st_size == mib * 2**20 + 1
    out.unlink()
    return {"mib": mib, "seconds": float(took), "peak_memory_mib": int(peak) / 2**20,
            "written_whole": whole}


def bench_long_line(tmp: Path, mib: int, timeout: float = 300) -> dict:
    """One MIB MiB line through the log file and the classifier, in-process: time, memory,
    and the time of a quarter of it (linear: the ratio is about 4; quadratic: 16)."""
    quarter = _long_line(tmp, max(1, mib // 4), timeout)
    full = _long_line(tmp, mib, timeout)
    if full["seconds"] and quarter["seconds"]:
        full["time_ratio_to_a_quarter_line"] = full["seconds"] / quarter["seconds"]
    return full | {"quarter": quarter}


def bench_help(runs: int) -> dict:
    """`vllm-supervise --help` wall time relative to `python -c pass` (medians)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))  # this tree's code, whatever is installed

    def timed(argv):
        ts = []
        for _ in range(runs):
            t = time.perf_counter()
            subprocess.run(argv, stdout=subprocess.DEVNULL, check=True, cwd=REPO, env=env)
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)
    base = timed([sys.executable, "-c", "pass"])
    exe = Path(sys.executable).with_name("vllm-supervise")
    cmd = [str(exe)]
    if not exe.exists() or subprocess.run([*cmd, "--help"], capture_output=True, env=env,
                                          check=False).returncode:
        cmd = [sys.executable, "-m", "vllm_supervisor"]  # no installed script for this tree
    helps = timed([*cmd, "--help"])
    return {"command": " ".join(Path(c).name for c in cmd), "python_pass_ms": base * 1000,
            "help_ms": helps * 1000, "ratio": helps / base}


def targets(r: dict) -> dict[str, bool]:
    """Each target and whether this run met it (printed, never turned into an exit code);
    only the figures this run took."""
    checks = {
        "escalation median <= 20 ms": ("escalation_precision",
                                       lambda v: v["median_ms"] <= 20),
        "death->report <= 20 ms (median)": ("death_to_report", lambda v: v["median_ms"] <= 20),
        "death->supervisor exit <= 10 ms (median)": ("death_to_exit",
                                                     lambda v: v["median_ms"] <= 10),
        "idle CPU < 0.5 % of a core": ("idle", lambda v: v["supervisor_cpu_pct"] < 0.5),
        "idle RSS < 60 MiB": ("idle", lambda v: v["supervisor_rss_mib"] < 60),
        "idle CPU with the metrics endpoint < 0.5 % of a core (supervisor and guard)":
            ("idle_metrics", lambda v: v["supervisor_cpu_pct"] < 0.5
             and v.get("guard_cpu_pct", 0) < 0.5),
        "log pass-through >= 0.9x (best runs; classifier and --log-file on)":
            ("log_passthrough", lambda v: v["ratio"] >= 0.9),
        "long line linear (time vs a quarter line < 8x) with < 16 MiB extra memory":
            ("long_line", lambda v: v.get("time_ratio_to_a_quarter_line", 99) < 8
             and v.get("peak_memory_mib", 99) < 16),
        "--help <= 3x python -c pass": ("help_startup", lambda v: v["ratio"] <= 3),
    }
    return {name: ok(r[key]) for name, (key, ok) in checks.items() if key in r}


def parse_args() -> argparse.Namespace:
    """Options; --quick picks small defaults (CI), explicit options still win."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="3 runs, 3 s idle, 200k lines, 2 log repetitions, a 20 MiB line (CI)")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--grace", type=float, default=0.5)
    ap.add_argument("--idle", type=float)
    ap.add_argument("--lines", type=int)
    ap.add_argument("--log-reps", type=int)
    ap.add_argument("--long-line-mib", type=int)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only", help="comma list of figures to take (escalation, stop, idle, "
                                   "logs, long, help); default all")
    ap.add_argument("--cuda-mib", type=int, default=0,
                    help="stop figure only: each worker holds this much real CUDA memory "
                         "(a GPU machine; the supervisor checks NVML)")
    ap.add_argument("--tp", type=int, default=1, help="stop figure: tensor-parallel workers")
    a = ap.parse_args()
    for k, v in (QUICK if a.quick else FULL).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def main() -> None:
    """Run every benchmark, print each figure as it comes, then the targets."""
    a = parse_args()
    results = {"machine": f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f}"
                          f" GiB, {sys.platform}, Python {sys.version.split()[0]}",
               "date": time.strftime("%Y-%m-%d"), "quick": a.quick, "tree": str(REPO)}
    with tempfile.TemporaryDirectory(prefix="vllm-supervise-bench-") as d:
        tmp = Path(d)
        steps = [("escalation", "escalation_precision",
                  lambda: bench_escalation(tmp, a.runs, a.grace)),
                 ("stop", ("death_to_report", "death_to_exit"),
                  lambda: bench_stop_latency(tmp, a.runs, a.cuda_mib, a.tp)),
                 ("idle", "idle", lambda: bench_idle(tmp, a.idle)),
                 ("idle", "idle_metrics", lambda: bench_idle(tmp, a.idle, metrics=True)),
                 ("logs", "log_passthrough", lambda: bench_logs(tmp, a.lines, a.log_reps)),
                 ("long", "long_line", lambda: bench_long_line(tmp, a.long_line_mib)),
                 ("help", "help_startup", lambda: bench_help(a.runs))]
        only = set(a.only.split(",")) if a.only else {key for key, _, _ in steps}
        for key, name, fn in steps:
            if key not in only:
                continue
            names, values = (name, fn()) if isinstance(name, tuple) else ((name,), (fn(),))
            for n, v in zip(names, values, strict=True):
                results[n] = v
                print(f"{n}: {json.dumps(v)}", flush=True)
    results["targets"] = targets(results)
    if a.quick:
        print("quick mode: rough figures; targets are judged on a full run (docs/benchmarks.md)")
    for k, v in results["targets"].items():
        print(f"{'met ' if v else 'MISSED'}  {k}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
