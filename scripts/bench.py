#!/usr/bin/env python3
"""Benchmarks for the supervised lifecycle, measured in one run, reported as figures and
ratios (docs/benchmarks.md records a run). CPU-only: uses the simulated vLLM.

  python scripts/bench.py [--runs 20] [--idle 60] [--lines 1000000] [--json OUT]
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
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
SIM = [sys.executable, "-m", "vllm_supervisor.simulated"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_env(tmp: Path, **extra) -> dict:
    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    shim = bindir / "vllm"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m vllm_supervisor.simulated "$@"\n')
    shim.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", FAKE_VLLM_STARTUP_S="0.2",
               PYTHONPATH=str(REPO), VLLM_SUPERVISE_STATE_DIR=str(tmp / "state"))
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Sup:
    """A supervisor subprocess whose stderr lines are timestamped on arrival."""

    def __init__(self, tmp: Path, sup_args: list[str], env: dict, stdout=subprocess.DEVNULL):
        self.report = tmp / f"report-{time.monotonic_ns()}.json"
        self.pidfile = tmp / f"pids-{time.monotonic_ns()}.json"
        env = dict(env, FAKE_VLLM_PIDFILE=str(self.pidfile))
        argv = [sys.executable, "-m", "vllm_supervisor", "serve", "--gpu-probe", "none",
                "--report-json", str(self.report), *sup_args, "bench/model",
                "--port", str(free_port())]
        self.proc = subprocess.Popen(argv, env=env, stdout=stdout, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for raw in self.proc.stderr:
            self.lines.append((time.monotonic(), raw.decode(errors="replace")))

    def wait_for(self, text: str, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, line in list(self.lines):
                if text in line:
                    return t
            time.sleep(0.005)
        raise RuntimeError(f"{text!r} not seen")

    def pids(self) -> dict:
        for _ in range(2000):
            try:
                return json.loads(self.pidfile.read_text())
            except (OSError, ValueError):
                time.sleep(0.01)
        raise RuntimeError("no pidfile")

    def finish(self) -> dict:
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


def bench_report_latency(tmp: Path, runs: int) -> dict:
    """From the last tree process's death (seen through pidfds, an independent observer) to
    the supervisor's report on its stderr."""
    env = fake_env(tmp)
    lat = []
    for _ in range(runs):
        s = Sup(tmp, ["--grace", "10"], env)
        s.wait_for("ready: ")
        p = s.pids()
        fds = [os.pidfd_open(x) for x in [p["api"], p["engine"], *p["workers"], p["tracker"]]]
        s.proc.send_signal(signal.SIGTERM)
        last = 0.0
        pending = list(fds)
        while pending:
            ready, _, _ = select.select(pending, [], [], 10)
            now = time.monotonic()
            for fd in ready:
                pending.remove(fd)
                last = now
        t_report = s.wait_for("stop report")
        s.finish()
        for fd in fds:
            os.close(fd)
        lat.append((t_report - last) * 1000)
    return {"runs": runs, "median_ms": statistics.median(lat), "max_ms": max(lat)}


def bench_idle(tmp: Path, seconds: float) -> dict:
    """Supervisor CPU (% of one core) and RSS while the simulated engine idles."""
    s = Sup(tmp, ["--grace", "5"], fake_env(tmp))
    s.wait_for("ready: ")
    time.sleep(1.0)
    sup = psutil.Process(s.proc.pid)
    guard = [c for c in sup.children() if "death guard" in " ".join(c.cmdline())]
    procs = [sup, *guard]
    c0 = [sum(p.cpu_times()[:2]) for p in procs]
    t0 = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - t0
    cpu = [sum(p.cpu_times()[:2]) - c for p, c in zip(procs, c0, strict=True)]
    res = {"seconds": round(wall, 1), "supervisor_cpu_pct": 100 * cpu[0] / wall,
           "supervisor_rss_mib": sup.memory_info().rss / 2**20,
           "supervisor_uss_mib": sup.memory_full_info().uss / 2**20}
    if guard:
        res["guard_cpu_pct"] = 100 * cpu[1] / wall
        res["guard_uss_mib"] = guard[0].memory_full_info().uss / 2**20
    s.proc.send_signal(signal.SIGTERM)
    s.finish()
    return res


FLOOD = re.compile(r"log flood done: (\d+) lines in ([0-9.]+) s")


def bench_logs(tmp: Path, lines: int) -> dict:
    """The simulated API server's own time to write LINES lines: to a file directly, then
    through the supervisor (whose stdout goes to a file). Ratio = direct / supervised."""
    env = fake_env(tmp, FAKE_VLLM_LOG_LINES=lines, FAKE_VLLM_STARTUP_S="0.2")
    out = tmp / "direct.out"
    with open(out, "wb") as f:
        p = subprocess.Popen([*SIM, "serve", "m", "--port", str(free_port())], env=env,
                             stdout=f, stderr=subprocess.PIPE, start_new_session=True)
        direct = None
        for raw in p.stderr:
            m = FLOOD.search(raw.decode(errors="replace"))
            if m:
                direct = float(m.group(2))
                break
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(30)
    with open(tmp / "supervised.out", "wb") as f:
        s = Sup(tmp, ["--grace", "5"], env, stdout=f)
        s.wait_for("log flood done")
        line = next(x for _, x in s.lines if "log flood done" in x)
        supervised = float(FLOOD.search(line).group(2))
        s.proc.send_signal(signal.SIGTERM)
        s.finish()
    return {"lines": lines, "direct_s": direct, "supervised_s": supervised,
            "ratio": direct / supervised}


def bench_help(runs: int) -> dict:
    """`vllm-supervise --help` wall time relative to `python -c pass` (medians)."""
    def timed(argv):
        ts = []
        for _ in range(runs):
            t = time.perf_counter()
            subprocess.run(argv, stdout=subprocess.DEVNULL, check=True, cwd=REPO)
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)
    base = timed([sys.executable, "-c", "pass"])
    exe = Path(sys.executable).with_name("vllm-supervise")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "vllm_supervisor"]
    helps = timed([*cmd, "--help"])
    return {"python_pass_ms": base * 1000, "help_ms": helps * 1000, "ratio": helps / base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--grace", type=float, default=0.5)
    ap.add_argument("--idle", type=float, default=60.0)
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    results = {"machine": f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f}"
                          f" GiB, {sys.platform}, Python {sys.version.split()[0]}",
               "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory(prefix="vllm-supervise-bench-") as d:
        tmp = Path(d)
        steps = [("escalation_precision", lambda: bench_escalation(tmp, a.runs, a.grace)),
                 ("death_to_report", lambda: bench_report_latency(tmp, a.runs)),
                 ("idle", lambda: bench_idle(tmp, a.idle)),
                 ("log_passthrough", lambda: bench_logs(tmp, a.lines)),
                 ("help_startup", lambda: bench_help(a.runs))]
        for name, fn in steps:
            results[name] = fn()
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    targets = {
        "escalation median <= 20 ms": results["escalation_precision"]["median_ms"] <= 20,
        "death->report <= 20 ms (median)": results["death_to_report"]["median_ms"] <= 20,
        "idle CPU < 0.5 % of a core": results["idle"]["supervisor_cpu_pct"] < 0.5,
        "idle RSS < 60 MiB": results["idle"]["supervisor_rss_mib"] < 60,
        "log pass-through >= 0.5x": results["log_passthrough"]["ratio"] >= 0.5,
        "--help <= 3x python -c pass": results["help_startup"]["ratio"] <= 3,
    }
    results["targets"] = targets
    for k, v in targets.items():
        print(f"{'met ' if v else 'MISSED'}  {k}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
