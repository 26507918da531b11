"""A simulated `vllm serve`: the same process tree as the real one, misbehaving on request.

Run as ``python -m vllm_supervisor.simulated serve MODEL [--port N] [-tp N] ...``. The tree is
API server -> resource-tracker helper + ``VLLM::EngineCore`` -> ``VLLM::Worker_TP<rank>``.
``FAKE_VLLM_*`` environment variables steer it (see ``Config``); process plumbing and the
misbehaviours themselves live in ``_simulated_misbehave``.
"""

from __future__ import annotations

import http.server
import itertools
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus

from vllm_supervisor import _simulated_cuda as cuda
from vllm_supervisor import _simulated_misbehave as mis
from vllm_supervisor._simulated_misbehave import (
    Child,
    Lines,
    Signals,
    child_setup,
    emit,
    flush,
    fork,
    log,
    select_fds,
    send,
    write_json_atomic,
)

VERSION = "0.0.0-simulated"
MISBEHAVIOURS = frozenset({
    "engine-ignores-term", "worker-hangs-shutdown", "api-ignores-term-during-startup",
    "worker-setsid", "grandchild-daemon", "grandchild-holds-stdout", "die-during-startup",
    "slow-startup", "rank-dies-in-collective",
})
ABORT_GRACE_S = 2.0  # how long the API server gives its engine before SIGKILL (abort mode)


class UsageError(Exception):
    """Bad command line or FAKE_VLLM_* value: exit 2."""


@dataclass
class Config:
    """Parsed command line plus FAKE_VLLM_* knobs.

    FAKE_VLLM_: MISBEHAVE (comma list of MISBEHAVIOURS), STARTUP_S, REQUEST_S, TERM_EXIT_CODE,
    EXIT_AFTER_S + EXIT_CODE, ORPHANS + ORPHAN_LIFE_S, LOG_LINES + LAST_LINE, PIDFILE,
    SIM_GPU_DIR + VRAM_MIB + VRAM_LEAK_MIB + VRAM_RELEASE_DELAY_S + NUM_GPUS; real CUDA memory:
    CUDA_MIB + NCCL + COLLECTIVE_AFTER_S (see ``_simulated_cuda``).
    """

    model: str
    host: str = "0.0.0.0"
    port: int = 8000
    tp: int = 1
    shutdown_timeout: float = 0.0
    misbehave: frozenset[str] = field(default_factory=frozenset)
    startup_s: float = 1.0
    request_s: float = 0.0
    term_exit_code: int = 0
    exit_after_s: float | None = None
    exit_code: int = 1
    orphans: int = 0
    orphan_life_s: float = 0.5
    log_lines: int = 0
    last_line: str | None = None
    pidfile: str | None = None
    gpu_dir: str | None = None
    vram_mib: int = 0
    vram_leak_mib: int = 0
    vram_release_delay_s: float = 0.0
    num_gpus: int = 0  # 0: one GPU per tensor-parallel rank
    cuda_mib: int = 0  # real CUDA memory per worker (_simulated_cuda)
    nccl: bool = False
    collective_after_s: float = 0.5
    nccl_port: int = 0  # picked by the engine before it forks the workers

    def has(self, name: str) -> bool:
        """Whether misbehaviour ``name`` is switched on."""
        return name in self.misbehave

    def fill_from_env(self, env) -> None:
        """Read the FAKE_VLLM_* knobs from ``env``."""
        names = {n.strip() for n in env.get("FAKE_VLLM_MISBEHAVE", "").split(",") if n.strip()}
        if names - MISBEHAVIOURS:
            unknown = ", ".join(sorted(names - MISBEHAVIOURS))
            raise UsageError(
                f"unknown FAKE_VLLM_MISBEHAVE name(s): {unknown} "
                f"(known: {', '.join(sorted(MISBEHAVIOURS))})"
            )
        self.misbehave = frozenset(names)
        self.startup_s = 3600.0 if self.has("slow-startup") else _env(env, "STARTUP_S", float, 1.0)
        self.request_s = _env(env, "REQUEST_S", float, 0.0)
        self.term_exit_code = _env(env, "TERM_EXIT_CODE", int, 0)
        self.exit_after_s = _env(env, "EXIT_AFTER_S", float, None)
        self.exit_code = _env(env, "EXIT_CODE", int, 1)
        self.orphans = _env(env, "ORPHANS", int, 0)
        self.orphan_life_s = _env(env, "ORPHAN_LIFE_S", float, 0.5)
        self.log_lines = _env(env, "LOG_LINES", int, 0)
        self.last_line = env.get("FAKE_VLLM_LAST_LINE")
        self.pidfile = env.get("FAKE_VLLM_PIDFILE") or None
        self.gpu_dir = env.get("FAKE_VLLM_SIM_GPU_DIR") or None
        self.vram_mib = _env(env, "VRAM_MIB", int, 0)
        self.vram_leak_mib = _env(env, "VRAM_LEAK_MIB", int, 0)
        self.vram_release_delay_s = _env(env, "VRAM_RELEASE_DELAY_S", float, 0.0)
        self.num_gpus = _env(env, "NUM_GPUS", int, 0) or self.tp
        self.cuda_mib = _env(env, "CUDA_MIB", int, 0)
        self.nccl = _env(env, "NCCL", int, 0) != 0
        self.collective_after_s = _env(env, "COLLECTIVE_AFTER_S", float, 0.5)
        if problem := cuda.config_error(self):
            raise UsageError(problem)


def _env(env, name: str, conv, default):
    raw = env.get("FAKE_VLLM_" + name, "").strip()
    if not raw:
        return default
    try:
        return conv(raw)
    except ValueError:
        raise UsageError(f"FAKE_VLLM_{name}={raw!r} is not a valid {conv.__name__}") from None


# vLLM-style options this simulation reads; every other option is accepted and ignored.
_OPTIONS = {
    "--host": ("host", str),
    "--port": ("port", int),
    "--tensor-parallel-size": ("tp", int),
    "-tp": ("tp", int),
    "--shutdown-timeout": ("shutdown_timeout", float),
    "--model": ("model", str),
}


def parse_args(argv: list[str]) -> Config | None:
    """Parse ``serve MODEL [options]``; None means ``--version`` was asked for."""
    if argv[:1] in (["--version"], ["-v"]):
        return None
    if argv[:1] != ["serve"]:
        raise UsageError("usage: vllm serve MODEL [--host H] [--port N] [-tp N] ... | --version")
    values: dict[str, object] = {}
    rest, i = argv[1:], 0
    while i < len(rest):
        name, eq, value = rest[i].partition("=")
        if name in _OPTIONS:
            if not eq:
                i += 1
                if i == len(rest):
                    raise UsageError(f"{name} needs a value")
                value = rest[i]
            key, conv = _OPTIONS[name]
            try:
                values[key] = conv(value)
            except ValueError:
                raise UsageError(f"{name}: invalid value {value!r}") from None
        elif "model" not in values and not name.startswith("-") and (
            i == 0 or not rest[i - 1].startswith("-") or "=" in rest[i - 1]
        ):
            # The positional model tag; a bare word after an unknown option is its value.
            values["model"] = name
        i += 1
    if "model" not in values:
        raise UsageError("no model given (vllm serve MODEL ...)")
    cfg = Config(**values)
    if cfg.tp < 1 or not 0 <= cfg.port <= 65535:
        raise UsageError("--tensor-parallel-size must be >= 1 and --port in 0..65535")
    return cfg


# ---------------------------------------------------------------- API server (launched process)


class ApiServer:
    """The launched process: starts the tree, waits for the engine, serves HTTP, shuts down."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.sigs = Signals()
        self.pids: dict[str, object] = {"api": os.getpid()}
        self.httpd: _HttpServer | None = None

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
        self.engine = Child(fork(engine_main, self.cfg, w))
        os.close(w)

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
        try:
            self.httpd = _HttpServer(cfg, self.engine)
        except OSError as exc:
            log("ERROR", f"[Errno {exc.errno}] error while attempting to bind on address "
                         f"({cfg.host!r}, {cfg.port}): {exc.strerror}")
            self._finish(exit_code=1)
        port = self.httpd.server_address[1]
        log("INFO", f"Starting vLLM API server 0 on http://{cfg.host}:{port}")
        emit(f"INFO:     Started server process [{os.getpid()}]")
        emit("INFO:     Waiting for application startup.")
        emit("INFO:     Application startup complete.")  # the socket is already listening
        threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True).start()
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
        if serving:
            emit("INFO:     Shutting down")
            self.httpd.shutdown()
            self.httpd.server_close()
            emit("INFO:     Waiting for application shutdown.")
        else:
            log("INFO", "Shutting down (signal received during startup)")
        self._finish(exit_code=self.cfg.term_exit_code, serving=serving)

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
            mis.kill(self.tracker.pid)
            self.tracker.wait()
        flush()
        os._exit(exit_code)

    def _stop_engine(self) -> None:
        cfg, engine = self.cfg, self.engine
        if engine.alive():
            os.kill(engine.pid, signal.SIGTERM)
        # A hung engine (or one stuck waiting for hung workers) is waited for forever, as in vLLM.
        hung = cfg.has("engine-ignores-term") or cfg.has("worker-hangs-shutdown")
        grace = None if hung else (cfg.shutdown_timeout or ABORT_GRACE_S)
        if not engine.wait(grace):
            log("WARNING", f"engine core pid {engine.pid} did not exit within {grace:g} s; "
                           "killing it (abort)", "core_client.py")
            mis.kill(engine.pid)
            engine.wait()

    def _write_pidfile(self) -> None:
        if self.cfg.pidfile:
            write_json_atomic(self.cfg.pidfile, self.pids)


class _HttpServer(http.server.ThreadingHTTPServer):
    allow_reuse_address = True  # SO_REUSEADDR, so a restart can rebind at once
    daemon_threads = True

    def __init__(self, cfg: Config, engine: Child):
        self.cfg, self.engine, self.ids = cfg, engine, itertools.count(1)
        self.address_family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        super().__init__((cfg.host, cfg.port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would resolve the host name (slow without DNS): skip it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.cfg.host), self.server_address[1]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version, sys_version = "uvicorn", ""
    server: _HttpServer

    def do_GET(self) -> None:
        """/health and /v1/models."""
        if self.path == "/health":
            self._reply(200 if self.server.engine.alive() else 503, None)
        elif self.path == "/v1/models":
            model = self.server.cfg.model
            self._reply(200, {"object": "list", "data": [{
                "id": model, "object": "model", "created": int(time.time()),
                "owned_by": "vllm", "root": model, "parent": None, "max_model_len": 2048}]})
        else:
            self._reply(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        """/v1/completions: a small OpenAI-style completion."""
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != "/v1/completions":
            return self._reply(404, {"detail": "Not Found"})
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            req = None
        if not isinstance(req, dict):
            return self._reply(400, {"object": "error", "message": "invalid JSON body"})
        if not self.server.engine.alive():
            return self._reply(503, {"object": "error", "message": "engine is dead"})
        time.sleep(self.server.cfg.request_s)
        tokens = int(req.get("max_tokens") or 16)
        self._reply(200, {
            "id": f"cmpl-sim-{next(self.server.ids)}", "object": "text_completion",
            "created": int(time.time()), "model": self.server.cfg.model,
            "choices": [{"index": 0, "text": " simulated" * min(tokens, 4), "logprobs": None,
                         "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1},
        })

    def _reply(self, code: int, obj) -> None:
        data = b"" if obj is None else json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_request(self, code="-", size="-") -> None:
        """Access line in uvicorn's format, on stdout."""
        host, port = self.client_address[:2]
        code = int(code)
        emit(f'INFO:     {host}:{port} - "{self.requestline}" {code} {HTTPStatus(code).phrase}')

    def log_message(self, format, *args) -> None:
        """Anything else http.server reports is a warning."""
        emit("WARNING:  " + format % args, err=True)


# ---------------------------------------------------------------- engine core and workers


def _join_inherited_group_and_hang() -> None:
    """vllm#7939: with RANK/WORLD_SIZE/MASTER_ADDR inherited from a torchrun job, the
    rendezvous waits for ranks that never come: silent, no CPU, deaf to SIGTERM."""
    env = os.environ
    if int(env.get("WORLD_SIZE", "1") or 1) > 1 and "RANK" in env and "MASTER_ADDR" in env:
        log("INFO", f"world_size={env['WORLD_SIZE']} rank={env['RANK']} "
                    f"distributed_init_method=env:// backend=gloo", "parallel_state.py")
        flush()
        while True:
            time.sleep(3600)


def engine_main(cfg: Config, ready_w: int) -> int:
    """VLLM::EngineCore: start the workers, wait until they loaded, report ready, serve."""
    ignores = cfg.has("engine-ignores-term")
    sigs = child_setup({ready_w}, "VLLM::EngineCore", "EngineCore_DP0",
                       on_term="ignore" if ignores else "pipe")
    log("INFO", f"Initializing a V1 LLM engine (v{VERSION}) with config: model={cfg.model!r}, "
                f"tensor_parallel_size={cfg.tp}", "core.py")
    _join_inherited_group_and_hang()
    # Nobody writes ctrl: workers see EOF on it exactly when this process is gone. The engine
    # itself deliberately does not watch its parent (vllm#55510: it outlives a SIGKILLed API).
    ctrl_r, _ctrl_w = os.pipe()  # the write end just stays open here
    rep_r, rep_w = os.pipe()
    cfg.nccl_port = cuda.free_port() if cfg.nccl else 0
    workers = {rank: Child(fork(worker_main, cfg, rank, ctrl_r, rep_w)) for rank in range(cfg.tp)}
    os.close(ctrl_r)
    os.close(rep_w)
    lines, started = Lines(rep_r), time.monotonic()
    hello: dict[int, dict] = {}
    loaded: set[int] = set()
    announced = ready = False
    reported: set[int] = set()
    while True:
        got = select_fds([rep_r if lines.open else None, sigs.r if sigs else None], 0.2)
        if sigs and sigs.r in got and sigs.drain():
            return _stop_workers(workers, 0)
        for kind, payload in (lines.read() or []) if rep_r in got else []:
            if kind == "hello":
                hello[payload["rank"]] = payload
            elif kind == "loaded":
                loaded.add(payload["rank"])
        if not announced and len(hello) == cfg.tp:
            announced = True  # the tree is complete (before loading ends): tell the API server
            extras = {k: v for p in hello.values() for k, v in p.items() if k not in ("rank", "pid")}
            workers_pids = [hello[rank]["pid"] for rank in sorted(hello)]
            send(ready_w, "tree", {"engine": os.getpid(), "workers": workers_pids, **extras})
        if not ready and len(loaded) == cfg.tp:
            ready = True
            mis.write_leak(cfg)
            log("INFO", f"init engine (profile, create kv cache, warmup model) took "
                        f"{time.monotonic() - started:.2f} seconds", "core.py")
            send(ready_w, "ready", {})
        for rank, worker in workers.items():
            if rank not in reported and not worker.alive():
                reported.add(rank)
                if not ready:  # a worker lost during startup fails the engine, as in vLLM
                    log("ERROR", f"Worker TP{rank} died during startup", "multiproc_executor.py")
                    return _stop_workers(workers, 1)
                log("WARNING", f"Worker TP{rank} (pid {worker.pid}) exited with status "
                               f"{worker.status}", "multiproc_executor.py")


def _stop_workers(workers: dict[int, Child], code: int) -> int:
    log("INFO", "Shutting down engine core; terminating workers", "core.py")
    for worker in workers.values():
        if worker.alive():
            os.kill(worker.pid, signal.SIGTERM)
    for worker in workers.values():
        worker.wait()  # forever: a hung worker hangs the engine, as in vLLM
    return code


def worker_main(cfg: Config, rank: int, ctrl_r: int, rep_w: int) -> int:
    """VLLM::Worker_TP<rank>: load (sleep), report, then live until SIGTERM or engine death."""
    if cfg.has("worker-setsid"):
        os.setsid()  # leaves the API server's process group and session
    sigs = child_setup({ctrl_r, rep_w}, f"VLLM::Worker_TP{rank}", f"Worker_TP{rank}", "pipe")
    extras = mis.spawn_tp0_helpers(cfg.misbehave) if rank == 0 else {}
    send(rep_w, "hello", {"rank": rank, "pid": os.getpid(), **extras})
    load_at, exit_at = time.monotonic() + cfg.startup_s, None
    while True:
        now = time.monotonic()
        wake = load_at if load_at is not None else exit_at
        got = select_fds([sigs.r, ctrl_r], None if wake is None else wake - now)
        if sigs.r in got and sigs.drain():
            return _worker_exit(cfg)
        if ctrl_r in got:  # EOF: the engine is gone
            log("INFO", "Parent process exited, terminating worker queues",
                "multiproc_executor.py")
            return _worker_exit(cfg)
        now = time.monotonic()
        if load_at is not None and now >= load_at:
            load_at = None
            mis.write_vram(cfg, rank)
            cuda.load(cfg, rank)  # real CUDA memory, held before "loaded" (FAKE_VLLM_CUDA_MIB)
            log("INFO", f"Model loading took {cfg.startup_s:.2f} s", "gpu_model_runner.py")
            send(rep_w, "loaded", {"rank": rank})
            if "holder" in extras:
                exit_at = now + 0.5
            elif cfg.has("rank-dies-in-collective"):
                exit_at = time.monotonic() + cfg.collective_after_s
        elif exit_at is not None and now >= exit_at:
            if cfg.has("rank-dies-in-collective"):
                cuda.die_in_collective(rank)  # never returns
            log("WARNING", "worker exiting by itself (grandchild-holds-stdout)", "worker.py")
            return 0


def _worker_exit(cfg: Config) -> int:
    if cfg.has("worker-hangs-shutdown"):
        log("INFO", "destroy_process_group() ... (simulated NCCL hang)", "parallel_state.py")
        mis.hang_forever()
    return 0


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
