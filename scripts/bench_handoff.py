"""GPU handoff and admission timing, with real supervisors over the simulated vLLM:

- handoff: `serve --replace a` of an instance at 0.9 of a GPU: from the old tree's verified
  VRAM release (its report's verdict_wall) to the new vLLM's launch (the new supervisor's
  "handoff: vLLM launched X ms after ..." line). Target <= 50 ms median.
- admission: an instance at 0.5 waiting behind one at 0.9; the latter is stopped: from its
  VRAM verdict "released" (report: verdict_wall) to the waiter's admission (its entry's
  since_wall), against one NVML poll (--vram-poll, 15 ms by default). Target <= one poll.
  The launch that follows is printed too.

    python scripts/bench_handoff.py [--runs 10] [--cuda]      # --cuda: real NVML + CUDA

Simulated GPU by default (any machine); --cuda makes the workers hold real CUDA memory on
GPU 0 and the supervisors read NVML. Not part of CI; figures go to docs/benchmarks.md."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.helpers import free_port, write_vllm_script

TOTAL_SIM_MIB = 81559


class Sup:
    """One `vllm-supervise serve` subprocess."""

    def __init__(self, work: Path, env: dict, name: str, fraction: float, mib: int,
                 *extra: str):
        self.report = work / f"report-{name}-{time.monotonic_ns()}.json"
        e = dict(env, FAKE_VLLM_CUDA_MIB=str(mib)) if env.get("_CUDA") else \
            dict(env, FAKE_VLLM_VRAM_MIB=str(mib))
        argv = [sys.executable, "-m", "vllm_supervisor", "serve", "--report-json",
                str(self.report), "--name", name, "--gpu-wait", "120", *extra,
                "fake/model", "--port", str(free_port()),
                "--gpu-memory-utilization", str(fraction)]
        self.err = work / f"err-{name}-{time.monotonic_ns()}.log"
        with open(self.err, "wb") as err:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(argv, env=e, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True)

    def text(self) -> str:
        return self.err.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no {needle!r}:\n{self.text()[-3000:]}")
            time.sleep(0.02)

    def stop(self) -> dict:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        self.proc.wait(120)
        return json.loads(self.report.read_text())


def setup(work: Path, cuda: bool) -> tuple[dict, int]:
    bindir = work / "bin"
    bindir.mkdir()
    write_vllm_script(bindir / "vllm")
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}",
               PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}",
               VLLM_SUPERVISE_STATE_DIR=str(work / "state"),
               VLLM_SUPERVISE_RESERVATIONS_DIR=str(work / "reservations"),
               FAKE_VLLM_STARTUP_S="0.2")
    if cuda:
        import pynvml

        pynvml.nvmlInit()
        total = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total
        env |= {"_CUDA": "1", "CUDA_VISIBLE_DEVICES": "0", "VLLM_SUPERVISE_GPU_PROBE": "auto"}
        return env, int(total / 2**20)
    gpus = work / "gpus"
    gpus.mkdir()
    env |= {"FAKE_VLLM_SIM_GPU_DIR": str(gpus), "FAKE_VLLM_NUM_GPUS": "1",
            "VLLM_SUPERVISE_GPU_PROBE": f"sim:{gpus}:1"}
    return env, TOTAL_SIM_MIB


def handoff(work: Path, env: dict, total: int) -> float:
    a = Sup(work, env, "a", 0.9, int(0.9 * total) - 1500)
    a.wait_for("ready:")
    b = Sup(work, env, "a", 0.9, int(0.9 * total) - 1500, "--replace", "a")
    b.wait_for("ready:")
    a.proc.wait(60)
    ms = float(re.search(r"handoff: vLLM launched ([0-9.]+) ms", b.text()).group(1))
    b.stop()
    return ms


def admission(work: Path, env: dict, total: int) -> float:
    a = Sup(work, env, "a", 0.9, int(0.9 * total) - 1500)
    a.wait_for("ready:")
    c = Sup(work, env, "c", 0.5, int(0.5 * total) - 1500)
    c.wait_for("waiting for GPU memory")
    vram = a.stop()["vram"]
    c.wait_for("ready:")
    admitted = next(e["since_wall"] for e in map(json.loads, map(Path.read_text, (
        work / "reservations").glob("r-*.json"))) if e["name"] == "c")
    launched = c.stop()["launch"]["started_wall"]
    print(f"  verdict -> admitted {1000 * (admitted - vram['verdict_wall']):.1f} ms -> "
          f"launched {1000 * (launched - admitted):.1f} ms", flush=True)
    return (admitted - vram["verdict_wall"]) * 1000


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--cuda", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = {"handoff_ms": [], "admission_ms": []}
    with tempfile.TemporaryDirectory(prefix="bench-handoff-") as tmp:
        work = Path(tmp)
        env, total = setup(work, args.cuda)
        for _ in range(args.runs):
            out["handoff_ms"].append(round(handoff(work, env, total), 1))
            out["admission_ms"].append(round(admission(work, env, total), 1))
    for key, target in (("handoff_ms", 50.0), ("admission_ms", 15.0)):
        v = out[key]
        print(f"{key}: median {statistics.median(v):.1f} ms, min {min(v):.1f}, "
              f"max {max(v):.1f} over {len(v)} runs (target <= {target:g} ms): {v}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
