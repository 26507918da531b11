"""A simulated `vllm serve`: the same process tree as the real one, misbehaving on request.

Run as ``python -m vllm_supervisor.sim serve MODEL [--port N] [-tp N] ...``. The tree is
API server -> resource-tracker helper + ``VLLM::EngineCore`` -> ``VLLM::Worker_TP<rank>``.
``FAKE_VLLM_*`` environment variables steer it (see ``Config``); process plumbing and the
misbehaviours themselves live in ``misbehave``, the HTTP side in ``httpapi``, the engine's
busy loop in ``core``.

Shutdown on SIGTERM/SIGINT follows vLLM's launcher (entrypoints/launchers/launcher.py): the
HTTP server keeps answering while the engine client stops - the engine is sent SIGTERM and
given --shutdown-timeout seconds to drain its requests (``core``), or ABORT_GRACE_S with
the default 0 (vLLM kills it at once) - and only then does HTTP stop. FAKE_VLLM_STOP_S adds
to that grace the seconds the workers take to stop (``engine._worker_exit``).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

from vllm_supervisor.sim import misbehave as mis
from vllm_supervisor.sim.client import EngineClient
from vllm_supervisor.sim.config import Config, UsageError, parse_args
from vllm_supervisor.sim.engine import VERSION, engine_main
from vllm_supervisor.sim.httpapi import HttpServer
from vllm_supervisor.sim.metrics import Metrics
from vllm_supervisor.sim.plumbing import (
    Child,
    Lines,
    Signals,
    emit,
    flush,
    fork,
    kill,
    log,
    select_fds,
    write_json_atomic,
)

ABORT_GRACE_S = 2.0  # how long the API server gives its engine before SIGKILL (abort mode)
ANSWER_GRACE_S = 2.0  # how long, once the engine is gone, handlers get to send their answers


# ---------------------------------------------------------------- API server (launched process)


class ApiServer:
    """The launched process: starts the tree, waits for the engine, serves HTTP, shuts down."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.sigs = Signals()
        self.pids: dict[str, object] = {"api": os.getpid()}
        self.httpd: HttpServer | None = None

    def run(self) -> None:
        """Run until shutdown or a simulated crash; never returns (exits via os._exit)."""
        cfg = self.cfg
        if cfg.has("api-ignores-term-during-startup"):
            self.sigs.ignore()  # like vLLM, which installs its handlers only once serving
        else:
            self.sigs.install()
        log("INFO", f"vLLM API server version {VERSION}")
        log("INFO", f"non-default args: {{'model': {cfg.model!r}, 'host': {cfg.host!r}, "
                    f"'port': {cfg.port}, 'tensor_parallel_size': {cfg.tp}}}", "utils.py")
        self._start_tree()
        self._await_ready()
        self._serve()

    def _start_tree(self) -> None:
        # The tracker goes first so it inherits as few descriptors as possible.
        r, self.tracker_w = os.pipe()
        self.tracker = Child(fork(mis.tracker_main, r))
        os.close(r)
        self.ready_r, w = os.pipe()
        api_sock, engine_sock = socket.socketpair()
        self.api_fd, engine_fd = api_sock.detach(), engine_sock.detach()
        self.engine = Child(fork(engine_main, self.cfg, w, engine_fd))
        os.close(w)
        os.close(engine_fd)

    def _await_ready(self) -> None:
        cfg, lines, die_at = self.cfg, Lines(self.ready_r), None
        while True:
            timeout = None if die_at is None else die_at - time.monotonic()
            ready = select_fds([self.ready_r, self.sigs.r], timeout)
            if self.sigs.r in ready and self.sigs.drain():
                self._shutdown(serving=False)
            if die_at is not None and time.monotonic() >= die_at:
                self._die_during_startup()
            if self.ready_r not in ready:
                continue
            got = lines.read()
            if got is None:  # engine gone before ready: vLLM gives up the same way
                log("ERROR", "Engine core initialization failed. See root cause above.",
                    "core_client.py")
                self._finish(exit_code=1, stop_engine=False)
            for kind, payload in got:
                if kind == "tree":
                    self.pids.update(payload, tracker=self.tracker.pid)
                    self._write_pidfile()
                    if cfg.has("die-during-startup"):
                        die_at = time.monotonic() + min(cfg.startup_s / 2, 1.0)
                elif kind == "ready":
                    if cfg.has("die-during-startup"):
                        self._die_during_startup()
                    return

    def _die_during_startup(self) -> None:
        log("ERROR", "simulated API server failure during startup (die-during-startup); "
                     "exiting 1 without stopping the engine")
        flush()
        os._exit(1)

    def _serve(self) -> None:
        cfg = self.cfg
        ready_at = time.monotonic()
        if cfg.has("api-ignores-term-during-startup"):
            self.sigs.install()
        if cfg.orphans > 0:  # fork while still single-threaded (no HTTP threads yet)
            self.pids["orphans"] = mis.spawn_orphans(cfg.orphans, cfg.orphan_life_s)
            self._write_pidfile()
        metrics = Metrics(cfg.served_name, enabled=not cfg.disable_log_stats)
        client = EngineClient(self.api_fd, metrics)
        client.start()
        try:
            self.httpd = HttpServer(cfg, self.engine, client, metrics)
        except OSError as exc:
            log("ERROR", f"[Errno {exc.errno}] error while attempting to bind on address "
                         f"({cfg.host!r}, {cfg.port}): {exc.strerror}")
            self._finish(exit_code=1)
        port = self.httpd.server_address[1]
        log("INFO", f"Starting vLLM API server 0 on http://{cfg.host}:{port}")
        emit(f"INFO:     Started server process [{os.getpid()}]")
        emit("INFO:     Waiting for application startup.")
        emit("INFO:     Application startup complete.")  # the socket is already listening
        # A short poll: the HTTP server stops last, after the engine, and must not linger.
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         name="http", daemon=True).start()
        emit(f"INFO:     Uvicorn running on http://{cfg.host}:{port} (Press CTRL+C to quit)")
        if cfg.log_lines > 0:
            mis.flood_stdout(cfg.log_lines, cfg.last_line)
        self._main_loop(ready_at)

    def _main_loop(self, ready_at: float) -> None:
        cfg, engine_dead_logged = self.cfg, False
        exit_at = None if cfg.exit_after_s is None else ready_at + cfg.exit_after_s
        while True:
            timeout = 1.0 if exit_at is None else min(1.0, exit_at - time.monotonic())
            if select_fds([self.sigs.r], timeout) and self.sigs.drain():
                self._shutdown(serving=True)
            if exit_at is not None and time.monotonic() >= exit_at:
                mis.crash(cfg.exit_code)
            if not engine_dead_logged and not self.engine.alive():
                log("ERROR", "Engine core proc EngineCore_DP0 died unexpectedly; "
                             "/health now answers 503", "core_client.py")
                engine_dead_logged = True

    def _shutdown(self, serving: bool) -> None:
        if not serving:
            log("INFO", "Shutting down (signal received during startup)")
            self._finish(exit_code=self.cfg.term_exit_code)
        timeout = self.cfg.shutdown_timeout
        log("INFO", "[shutdown] API server: shutdown triggered", "launcher.py")
        log("INFO", f"[shutdown] API server: stopping engine client "
                    f"mode={'drain' if timeout else 'abort'} timeout={timeout:g}s", "launcher.py")
        log("INFO", f"[shutdown] MPClient: start timeout={timeout:g}s", "core_client.py")
        log("INFO", "[shutdown] MPClient: stopping engine manager", "core_client.py")
        self._stop_engine()  # HTTP answers meanwhile: /health, /metrics, requests in flight
        for step in ("engine manager stopped", "cleaning up background resources", "complete"):
            log("INFO", f"[shutdown] MPClient: {step}", "core_client.py")
        log("INFO", "[shutdown] API server: engine client stopped", "launcher.py")
        self.httpd.wait_idle(ANSWER_GRACE_S)  # the last answers go out
        log("INFO", "[shutdown] API server: signalling HTTP server shutdown", "launcher.py")
        log("INFO", "[shutdown] API server: shutting down FastAPI HTTP server", "launcher.py")
        emit("INFO:     Shutting down")
        self.httpd.shutdown()
        self.httpd.server_close()
        emit("INFO:     Waiting for application shutdown.")
        self._finish(exit_code=self.cfg.term_exit_code, stop_engine=False, serving=True)

    def _finish(self, exit_code: int, stop_engine: bool = True, serving: bool = False) -> None:
        if stop_engine:
            self._stop_engine()
        else:
            self.engine.wait()
        if serving:
            emit("INFO:     Application shutdown complete.")
            emit(f"INFO:     Finished server process [{os.getpid()}]")
        os.close(self.tracker_w)  # EOF: the tracker exits
        if not self.tracker.wait(2.0):
            kill(self.tracker.pid)
            self.tracker.wait()
        flush()
        os._exit(exit_code)

    def _stop_engine(self) -> None:
        cfg, engine = self.cfg, self.engine
        if engine.alive():
            log("INFO", "[shutdown] Process manager: send sigterm to process EngineCore",
                "utils.py")
            os.kill(engine.pid, signal.SIGTERM)
        # A hung engine (or one stuck waiting for hung workers) is waited for forever, as in vLLM.
        hung = cfg.has("engine-ignores-term") or cfg.has("worker-hangs-shutdown")
        # FAKE_VLLM_STOP_S: the workers' slow teardown is waited for on top of the grace.
        grace = None if hung else (cfg.shutdown_timeout or ABORT_GRACE_S) + cfg.stop_s
        if not engine.wait(grace):
            log("WARNING", "[shutdown] Process manager: force killing remaining processes "
                           "count=1", "utils.py")
            log("WARNING", f"[shutdown] Process manager: force killing remaining process "
                           f"EngineCore pid {engine.pid}", "utils.py")
            kill(engine.pid)
            engine.wait()

    def _write_pidfile(self) -> None:
        if self.cfg.pidfile:
            write_json_atomic(self.cfg.pidfile, self.pids)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``serve MODEL ...`` runs the simulated server, ``--version`` the version."""
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        if cfg is not None:
            cfg.fill_from_env(os.environ)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if cfg is None:
        print(VERSION)
        return 0
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    ApiServer(cfg).run()
    return 1  # not reached: run() ends with os._exit


if __name__ == "__main__":
    sys.exit(main())
