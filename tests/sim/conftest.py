"""The `sim` fixture: simulated vLLM servers launched on their own (no supervisor), each in
its own session, and everything they started killed (by PID) afterwards."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import REPO, free_port, http_get, read_pidfile, survivors, wait_until


class Sim:
    """One launched `python -m vllm_supervisor.sim serve m ...` in its own session."""

    def __init__(self, tmp_path: Path, idx: int, args, env: dict, tp: int, startup: float):
        self.port = free_port()
        self.pidfile = tmp_path / f"pids{idx}.json"
        self.out_path, self.err_path = tmp_path / f"out{idx}.log", tmp_path / f"err{idx}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_VLLM_")}
        full_env.update({"PYTHONPATH": str(REPO), "FAKE_VLLM_STARTUP_S": str(startup),
                         "FAKE_VLLM_PIDFILE": str(self.pidfile), **env})  # env may override
        cmd = [sys.executable, "-m", "vllm_supervisor.sim", "serve", "m",
               "--port", str(self.port), "-tp", str(tp), *args]
        self.started = time.time()
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err, start_new_session=True)
        self.pid = self.proc.pid

    def pids(self, key: str = "workers", timeout: float = 5.0) -> dict:
        """The pidfile once it holds ``key``."""
        return wait_until(lambda: read_pidfile(self.pidfile, key), timeout,
                          lambda: f"a pidfile with {key!r}; stderr: {self.err()}")

    def tree(self) -> list[int]:
        """API, tracker, engine and worker pids."""
        p = self.pids()
        return [p["api"], p["tracker"], p["engine"], *p["workers"]]

    def get(self, path: str):
        """(status, body) of GET ``path``; status None when nothing listens."""
        return http_get(self.port, path)

    def post(self, path: str, obj=None, timeout: float = 5.0, headers: dict | None = None):
        """(status, body) of POST ``path`` with ``obj`` as JSON; status None when nothing
        answered within ``timeout`` (or the connection broke)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("POST", path, body=None if obj is None else json.dumps(obj),
                         headers={"Content-Type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException):
            return None, b""
        finally:
            conn.close()

    def complete(self, max_tokens: int = 4, timeout: float = 10.0, **extra):
        """(status, JSON body or None) of one completion."""
        status, body = self.post("/v1/completions", {"prompt": "hello there",
                                                     "max_tokens": max_tokens, **extra}, timeout)
        return status, json.loads(body) if body else None

    def metrics(self) -> dict[tuple, float]:
        """/metrics as {(sample name, sorted label items): value}, without _created ones."""
        status, body = self.get("/metrics")
        assert status == 200, status
        return {(smp.name, tuple(sorted(smp.labels.items()))): smp.value
                for fam in text_string_to_metric_families(body.decode())
                for smp in fam.samples if not smp.name.endswith("_created")}

    def metric(self, name: str, **labels) -> float | None:
        """One vllm: sample of engine 0 for model "m" (None: not exported)."""
        key = (name, tuple(sorted({"engine": "0", "model_name": "m", **labels}.items())))
        return self.metrics().get(key)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Until /health answers 200."""
        wait_until(lambda: self.get("/health")[0] == 200, timeout,
                   lambda: f"/health to answer 200; stderr: {self.err()}")

    def out(self) -> str:
        """Everything on stdout so far."""
        return self.out_path.read_text()

    def err(self) -> str:
        """Everything on stderr so far."""
        return self.err_path.read_text()

    def cleanup(self) -> None:
        """SIGKILL the session's group and every pid the pidfile names (if still ours)."""
        pids = {self.pid}
        if self.pidfile.exists():
            for value in json.loads(self.pidfile.read_text()).values():
                pids.update(value if isinstance(value, list) else [value])
        try:  # the API server is unreaped until proc.wait(), so its group id cannot be reused
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in pids:
            try:
                if psutil.Process(pid).create_time() >= self.started - 1:
                    os.kill(pid, signal.SIGKILL)
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        self.proc.wait(5)
        left = survivors(pids, timeout=5)
        assert not left, f"leftover processes: {sorted(left)}"


@pytest.fixture
def sim(tmp_path):
    """Factory launching simulated servers; everything they started is killed afterwards."""
    sims: list[Sim] = []

    def start(*args, env=None, tp=1, startup=0.2) -> Sim:
        s = Sim(tmp_path, len(sims), args, env or {}, tp, startup)
        sims.append(s)
        return s

    yield start
    for s in sims:
        s.cleanup()
