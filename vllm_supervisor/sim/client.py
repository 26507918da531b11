"""The simulated API server's engine client: HTTP threads hand requests and utility calls
to the engine over its socket and wait for the answer; one reader thread takes the
engine's outputs, results and stats. When the engine is gone (the socket closes), every
waiter gets EngineDead, as vLLM's AsyncLLM raises EngineDeadError."""

from __future__ import annotations

import itertools
import json
import socket
import threading

from vllm_supervisor.sim.metrics import Metrics
from vllm_supervisor.sim.plumbing import Lines


class EngineDead(Exception):
    """The engine process is gone."""


class Pending:
    """One answer the engine owes."""

    def __init__(self):
        self._done = threading.Event()
        self._value: dict | None = None

    def settle(self, value: dict | None) -> None:
        """Hand over the answer (None: the engine died)."""
        self._value = value
        self._done.set()

    def wait(self) -> dict:
        """Block until the engine answers (forever if it never does)."""
        self._done.wait()
        if self._value is None:
            raise EngineDead()
        return self._value


class EngineClient:
    """Requests out to the engine, answers and stats back in."""

    def __init__(self, fd: int, metrics: Metrics):
        self.sock = socket.socket(fileno=fd)
        self.metrics = metrics
        self.ids = itertools.count(1)
        self.lock = threading.Lock()  # guards pending and dead
        self.send_lock = threading.Lock()  # one writer at a time
        self.pending: dict[int, Pending] = {}
        self.dead = False

    def start(self) -> None:
        """Start reading the engine's messages."""
        threading.Thread(target=self._read, name="engine-output", daemon=True).start()

    def generate(self, kind: str, prompt: int, max_tokens: int) -> Pending:
        """Queue one request ("generate" or "embed") in the engine."""
        rid = next(self.ids)
        return self._send(rid, "add", {"id": rid, "kind": kind, "prompt": prompt,
                                       "max_tokens": max_tokens})

    def call(self, method: str, **args) -> Pending:
        """A utility call (sleep, wake_up, is_sleeping)."""
        cid = next(self.ids)
        return self._send(cid, "call", {"id": cid, "method": method, **args})

    def _send(self, key: int, kind: str, payload: dict) -> Pending:
        pending = Pending()
        with self.lock:
            if self.dead:
                raise EngineDead()
            self.pending[key] = pending
        try:
            with self.send_lock:  # blocks while a stopped engine's socket buffer is full
                self.sock.sendall(f"{kind} {json.dumps(payload)}\n".encode())
        except OSError:
            with self.lock:
                self.pending.pop(key, None)
            raise EngineDead() from None
        return pending

    def _read(self) -> None:
        lines = Lines(self.sock.fileno())
        while (got := lines.read()) is not None:
            for kind, payload in got:
                if kind == "stats":
                    self.metrics.record(payload)
                    continue
                with self.lock:
                    pending = self.pending.pop(payload["id"], None)
                if pending:
                    pending.settle(payload)
        with self.lock:
            self.dead = True
            gone, self.pending = list(self.pending.values()), {}
        for pending in gone:
            pending.settle(None)
