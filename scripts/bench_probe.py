"""The progress probe against the real vLLM CPU build (scripts/prepare_real_vllm.sh):
(1) time from a frozen VLLM::EngineCore (SIGSTOP) to the hang verdict with the default
probe settings, against the formula (failures + 1) x interval + failures x timeout;
(2) the probe's cost under load: completion throughput of a supervised vLLM with the probe
(default settings) and without (--probe off), in alternating runs, median and spread.

    python scripts/bench_probe.py [--freezes 3] [--runs 5] [--seconds 20] [--clients 6]

Not part of CI (minutes of real vLLM); figures go to docs/benchmarks.md."""

from __future__ import annotations

import argparse
import json
import os
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
HOME = Path(os.environ.get("VLLM_SUPERVISE_REAL_VLLM_HOME",
                           Path.home() / ".cache/vllm-supervise/real-vllm"))
VLLM, MODEL = HOME / "venv/bin/vllm", str(HOME / "tiny-llama")
ARGS = ("--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "4",
        "--enforce-eager")
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_TARGET_DEVICE": "cpu",
       "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
       "VLLM_CACHE_ROOT": str(HOME / "cache")}
sys.path.insert(0, str(REPO))
from vllm_supervisor.lifecycle.config import (
    DEFAULT_PROBE_FAILURES,
    DEFAULT_PROBE_INTERVAL_S,
    DEFAULT_PROBE_TIMEOUT_S,
)
from vllm_supervisor.lifecycle.progress import ProbeSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A supervised real vLLM; its stderr lines with the time each arrived."""

    def __init__(self, tmp: Path, *sup_args: str):
        self.port = free_port()
        argv = [sys.executable, "-m", "vllm_supervisor", "serve", "--gpu-probe", "none",
                "--vllm-bin", str(VLLM), "--state-dir", str(tmp / "state"), "--name",
                f"bench-{self.port}", *sup_args, MODEL, "--port", str(self.port), *ARGS]
        self.proc = subprocess.Popen(argv, cwd=REPO, env=dict(os.environ, **ENV),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in self.proc.stderr:
            self.lines.append((time.monotonic(), raw.decode(errors="replace")))

    def wait_for(self, text: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, line in list(self.lines):
                if text in line:
                    return t
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{text!r} not seen: {''.join(l for _, l in self.lines[-20:])}")

    def engine(self) -> int:
        for c in psutil.Process(self.proc.pid).children(recursive=True):
            if " ".join(c.cmdline()).startswith("VLLM::EngineCore"):
                return c.pid
        raise RuntimeError("no VLLM::EngineCore")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(180)


def complete(port: int, max_tokens: int) -> int:
    body = json.dumps({"model": MODEL, "prompt": "def main():", "max_tokens": max_tokens,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())["usage"]["completion_tokens"]


def load(port: int, seconds: float, clients: int, max_tokens: int) -> float:
    """Output tokens per second of CLIENTS clients for SECONDS (requests finished in it)."""
    end, tokens, lock = time.monotonic() + seconds, [0], threading.Lock()

    def client():
        while time.monotonic() < end:
            n = complete(port, max_tokens)
            if time.monotonic() <= end:
                with lock:
                    tokens[0] += n

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tokens[0] / (time.monotonic() - t0)


def bench_freeze(tmp: Path, n: int) -> dict:
    formula = ProbeSettings("completion", DEFAULT_PROBE_INTERVAL_S, DEFAULT_PROBE_TIMEOUT_S,
                            DEFAULT_PROBE_FAILURES, "generate", None).worst_verdict_s()
    verdicts, exits = [], []
    for _ in range(n):
        s = Served(tmp, "--grace", "5")
        try:
            s.wait_for("answered /health after", 300)
            os.kill(s.engine(), signal.SIGSTOP)
            frozen = time.monotonic()
            verdicts.append(s.wait_for("engine hung: ", formula + 60) - frozen)
            exits.append(s.proc.wait(120))
        finally:
            if s.proc.poll() is None:
                os.killpg(s.proc.pid, signal.SIGKILL)
                s.proc.wait(30)
    return {"freeze_to_verdict_s": [round(v, 1) for v in verdicts], "formula_s": formula,
            "median_s": round(statistics.median(verdicts), 1), "exit_codes": exits}


def bench_load(tmp: Path, runs: int, seconds: float, clients: int) -> dict:
    on, off = Served(tmp), Served(tmp, "--probe", "off")
    got: dict[str, list[float]] = {"probe": [], "off": []}
    try:
        for s in (on, off):
            s.wait_for("answered /health after", 300)
            complete(s.port, 8)  # warm
        for i in range(runs):
            for name, s in (("probe", on), ("off", off)) if i % 2 == 0 else \
                    (("off", off), ("probe", on)):
                got[name].append(load(s.port, seconds, clients, 64))
    finally:
        on.stop()
        off.stop()
    out = {}
    for name, vals in got.items():
        out[name] = {"tokens_per_s": [round(v, 1) for v in vals],
                     "median": round(statistics.median(vals), 1),
                     "spread": round(max(vals) - min(vals), 1)}
    out["ratio_probe_to_off"] = round(out["probe"]["median"] / out["off"]["median"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--freezes", type=int, default=3)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--clients", type=int, default=6)
    a = ap.parse_args()
    if not VLLM.exists():
        sys.exit(f"no real vLLM in {HOME}: run scripts/prepare_real_vllm.sh")
    with tempfile.TemporaryDirectory(prefix="vs-bench-probe-") as tmp:
        result = {"freeze": bench_freeze(Path(tmp), a.freezes),
                  "load": bench_load(Path(tmp), a.runs, a.seconds, a.clients)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
