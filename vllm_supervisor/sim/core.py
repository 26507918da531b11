"""The simulated VLLM::EngineCore once it is ready: its busy loop.

Requests and utility calls (sleep, wake_up, is_sleeping) come from the API server over a
socket, one ``kind JSON`` line each. Each step is a collective call: every worker is asked
for its part and all are waited for, as vLLM's MultiprocExecutor does, up to
VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS (300 s); past it the engine dies ("RPC call to
execute_model timed out.", v1/executor/multiproc_executor.py). After a step the engine
pushes the finished requests and, unless --disable-log-stats, the step's stats.

SIGTERM (v1/engine/core.py ``_handle_shutdown``): with --shutdown-timeout 0 the engine
aborts what it holds and stops (the API server's clients get an error when the socket
closes); with N > 0 it drains: new requests are answered at once with finish reason
"abort", the ones it holds run to their end, then it stops. The API server enforces N.
"""

from __future__ import annotations

import json
import os
import signal
import time

from vllm_supervisor.sim.batching import Finished, Scheduler, abort_stats
from vllm_supervisor.sim.plumbing import Child, Lines, kill, log, select_fds, send, write_all

SLEEP_TAGS = frozenset({"weights", "kv_cache"})
WORKER_SHUTDOWN_S = 5.0  # vLLM's VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS, on a fatal error


class EngineCore:
    """The ready engine: scheduler, workers' steps, the API server's socket, shutdown."""

    def __init__(self, cfg, sigs, workers: dict[int, Child], step_ws: dict[int, int],
                 reps: Lines, api_fd: int, reported: set[int]):
        self.cfg, self.sigs, self.workers, self.step_ws = cfg, sigs, workers, step_ws
        self.reps, self.api, self.reported = reps, Lines(api_fd), reported
        self.sched = Scheduler(cfg)
        self.log_stats = not cfg.disable_log_stats
        self.calls = 0
        self.draining = False
        self.sleeping_tags: set[str] = set()
        self.sleep_waiter: tuple[int, int] | None = None  # sleep(mode=wait): call, level

    def run(self) -> int:
        """Serve until SIGTERM has been dealt with; the exit code."""
        while True:
            due = self.sched.plan() is not None
            sig_r = self.sigs.r if self.sigs else None
            got = select_fds([self.api.fd if self.api.open else None, sig_r], 0 if due else 0.2)
            if sig_r in got and (nums := self.sigs.drain()) and self._on_term(nums[0]):
                return self._teardown()
            if self.api.fd in got:  # EOF: the API server is gone; the engine lives on
                for kind, payload in self.api.read() or []:
                    self._on_api(kind, payload)
            duration = self.sched.plan()
            if duration is not None:
                self._step(duration)
            if self.sleep_waiter and not self.sched.running:
                call, level = self.sleep_waiter
                self.sleep_waiter = None
                self._fall_asleep(call, level)
            if self.draining and not self.sched.unfinished():
                return self._teardown()
            report_deaths(self.workers, self.reported, ready=True)

    # ------------------------------------------------------------ steps and workers

    def _step(self, duration: float) -> None:
        self._collective("execute_model", duration)
        finished, stats = self.sched.finish_step(self.log_stats)
        if stats:  # first, so the numbers are in before any client has its answer
            self._to_api("stats", stats)
        for f in finished:
            self._out(f)

    def _collective(self, method: str, duration: float) -> None:
        """Ask every worker for its part and wait for all of them (a worker that never
        answers blocks the engine here)."""
        self.calls += 1
        for w in self.step_ws.values():
            send(w, "rpc", {"n": self.calls, "method": method, "s": duration})
        pending = set(self.step_ws)
        deadline = time.monotonic() + self.cfg.execute_timeout_s
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                self._die(f"RPC call to {method} timed out.")
            if select_fds([self.reps.fd if self.reps.open else None], left):
                for kind, payload in self.reps.read() or []:
                    if kind == "done" and payload["n"] == self.calls:
                        pending.discard(payload["rank"])

    def _die(self, why: str) -> None:
        log("ERROR", f"TimeoutError: {why}", "multiproc_executor.py")
        log("ERROR", "EngineCore encountered a fatal error.", "core.py")
        for worker in self.workers.values():
            if worker.alive():
                os.kill(worker.pid, signal.SIGTERM)
        for worker in self.workers.values():
            if not worker.wait(WORKER_SHUTDOWN_S):
                log("WARNING", f"[shutdown] Process manager: force killing remaining process "
                               f"Worker pid {worker.pid}", "multiproc_executor.py")
                kill(worker.pid)
                worker.wait()
        raise SystemExit(1)

    # ------------------------------------------------------------ the API server's side

    def _on_api(self, kind: str, p: dict) -> None:
        if kind == "add":
            if self.draining:  # vLLM's _reject_add_in_shutdown: an abort output at once
                if self.log_stats:
                    self._to_api("stats", abort_stats(["abort"]))
                self._to_api("out", {"id": p["id"], "tokens": 0, "prompt": p["prompt"],
                                     "finish": "abort"})
                return
            self.sched.add(p["id"], p["kind"], p["prompt"], p["max_tokens"])
        elif kind == "call":
            if self.draining:
                log("WARNING", f"[shutdown] EngineCore: rejecting utility call "
                               f"method={p['method']}", "core.py")
                self._reply(p["id"], error="Server shutting down")
            elif p["method"] == "sleep":
                self._sleep(p["id"], p["level"], p["mode"])
            elif p["method"] == "wake_up":
                self._wake_up(p["id"], p["tags"])
            else:  # is_sleeping
                self._reply(p["id"], self.sched.paused is not None or bool(self.sleeping_tags))

    def _sleep(self, call: int, level: int, mode: str) -> None:
        """vLLM's EngineCore.sleep: pause the scheduler (abort, wait or keep), then sleep."""
        if mode == "abort":
            self._abort(self.sched.abort_all())
        self.sched.paused = "all" if mode == "keep" else "new"
        if mode == "wait" and self.sched.running:
            log("INFO", "Waiting for in-flight requests to complete before sleeping...",
                "core.py")
            self.sleep_waiter = (call, level)
            return
        self._fall_asleep(call, level)

    def _fall_asleep(self, call: int, level: int) -> None:
        if level >= 1:
            if "weights" in self.sleeping_tags:
                log("WARNING", "Executor is already sleeping.", "abstract.py")
            else:
                t0 = time.perf_counter()
                self._collective("sleep", 0.0)
                self.sleeping_tags = set(SLEEP_TAGS)
                log("INFO", f"It took {time.perf_counter() - t0:.6f} seconds to fall asleep.",
                    "abstract.py")
        self._reply(call, None)

    def _wake_up(self, call: int, tags: list[str] | None) -> None:
        if tags is not None and "scheduling" in tags:
            tags = [t for t in tags if t != "scheduling"]
        if tags is None or tags:
            if not self.sleeping_tags:
                log("WARNING", "Executor is not sleeping.", "abstract.py")
            elif tags and not set(tags) <= self.sleeping_tags:
                log("WARNING", f"Tags {tags} are not all in sleeping tags "
                               f"{sorted(self.sleeping_tags)}", "abstract.py")
            else:
                t0 = time.perf_counter()
                self._collective("wake_up", 0.0)
                log("INFO", f"It took {time.perf_counter() - t0:.6f} seconds to wake up tags "
                            f"{tags if tags else sorted(self.sleeping_tags)}.", "abstract.py")
                self.sleeping_tags -= set(tags) if tags else self.sleeping_tags
        if not self.sleeping_tags:
            self.sched.paused = None  # fully awake: the scheduler resumes
        self._reply(call, not self.sleeping_tags)

    def _abort(self, gone: list[Finished]) -> None:
        if gone and self.log_stats:
            self._to_api("stats", abort_stats([f.reason for f in gone]))
        for f in gone:
            self._out(f)

    def _out(self, f: Finished) -> None:
        self._to_api("out", {"id": f.req.rid, "tokens": f.req.done, "prompt": f.req.prompt,
                             "finish": f.reason})

    def _reply(self, call: int, value=None, error: str | None = None) -> None:
        self._to_api("result", {"id": call, "value": value, "error": error})

    def _to_api(self, kind: str, payload: dict) -> None:
        if self.api.open:  # a failed write means the API server is gone: nobody to tell
            write_all(self.api.fd, f"{kind} {json.dumps(payload)}\n".encode())

    def _on_term(self, signum: int) -> bool:
        """vLLM's _handle_shutdown; whether to stop now."""
        log("INFO", f"[shutdown] EngineCore: trigger received "
                    f"signal={signal.Signals(signum).name}", "core.py")
        if self.draining:
            return False
        timeout = int(self.cfg.shutdown_timeout)
        count = self.sched.unfinished()
        log("INFO", f"[shutdown] EngineCore: start mode={'drain' if timeout else 'abort'} "
                    f"timeout={timeout}s", "core.py")
        if timeout:
            if count:
                log("INFO", f"[shutdown] EngineCore: draining in-flight requests "
                            f"count={count} timeout={timeout}s", "core.py")
            self.draining = True
            return False
        if count:
            log("INFO", f"[shutdown] EngineCore: aborting in-flight requests count={count}",
                "core.py")
        self.sched.abort_all()
        return True

    def _teardown(self) -> int:
        log("INFO", "[shutdown] EngineCore: request processing complete; starting resource "
                    "teardown", "core.py")
        log("INFO", "[shutdown] EngineCore: exiting busy loop", "core.py")
        log("INFO", f"[shutdown] Executor: waiting for worker exit count={len(self.workers)}",
            "multiproc_executor.py")
        return stop_workers(self.workers, 0)


def report_deaths(workers: dict[int, Child], reported: set[int], ready: bool) -> bool:
    """Log each worker's exit once; whether one died before the engine was ready."""
    lost = False
    for rank, worker in workers.items():
        if rank not in reported and not worker.alive():
            reported.add(rank)
            if not ready:  # a worker lost during startup fails the engine, as in vLLM
                log("ERROR", f"Worker TP{rank} died during startup", "multiproc_executor.py")
                lost = True
            else:
                log("WARNING", f"Worker TP{rank} (pid {worker.pid}) exited with status "
                               f"{worker.status}", "multiproc_executor.py")
    return lost


def stop_workers(workers: dict[int, Child], code: int) -> int:
    """SIGTERM the workers and wait for them, forever (a hung worker hangs the engine)."""
    log("INFO", "Shutting down engine core; terminating workers", "core.py")
    for worker in workers.values():
        if worker.alive():
            os.kill(worker.pid, signal.SIGTERM)
    for worker in workers.values():
        worker.wait()
    return code
