"""The simulated API server's HTTP side, with uvicorn-style access lines.

Routes, as vLLM 0.32 registers them (entrypoints/launchers/api_server/routers.py):
GET /health (200, or 503 once the engine process is gone), GET /metrics (always 200, see
``metrics``), GET /v1/models; POST /v1/completions for a generative model, POST
/v1/embeddings for a pooling one (the other route is not registered: 404); with
VLLM_SERVER_DEV_MODE=1 also POST /sleep?level=0|1|2&mode=abort|wait|keep, POST
/wake_up[?tags=...] and GET /is_sleeping (entrypoints/serve/dev/sleep/api_router.py).
Completions, embeddings and the sleep calls go through the engine and wait for it, for
ever if it never answers. Unknown path: 404, wrong method: 405 (FastAPI's
``{"detail": ...}``); bad body or query: 400; a dead engine: 500 (EngineDeadError).

API key (--api-key K, else VLLM_API_KEY): paths under /v1, /v2, /inference and /cohere
need ``Authorization: Bearer K``, else 401 ``{"error": "Unauthorized"}``; /health,
/metrics and the sleep routes stay open (entrypoints/serve/middleware/authenticate.py).
"""

from __future__ import annotations

import http.server
import json
import socket
import socketserver
import threading
import time
from http import HTTPStatus
from urllib.parse import parse_qs

from vllm_supervisor.sim import openai
from vllm_supervisor.sim.client import EngineClient, EngineDead
from vllm_supervisor.sim.config import Config
from vllm_supervisor.sim.metrics import CONTENT_TYPE, Metrics
from vllm_supervisor.sim.plumbing import Child, emit, log

GUARDED = ("/v1", "/v2", "/inference", "/cohere")
PAUSE_MODES = ("abort", "wait", "keep")


class HttpServer(http.server.ThreadingHTTPServer):
    """The listening server; counts the requests being handled (for the drain)."""

    allow_reuse_address = True  # SO_REUSEADDR, so a restart can rebind at once
    daemon_threads = True

    def __init__(self, cfg: Config, engine: Child, client: EngineClient, metrics: Metrics):
        self.cfg, self.engine, self.client, self.metrics = cfg, engine, client, metrics
        self.busy, self.idle = 0, threading.Condition()
        self.address_family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        super().__init__((cfg.host, cfg.port), Handler)

    def server_bind(self) -> None:
        """Bind without resolving the host name (HTTPServer's way is slow without DNS)."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.cfg.host), self.server_address[1]

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is being handled; whether that happened in time."""
        with self.idle:
            return self.idle.wait_for(lambda: self.busy == 0, timeout)


class Handler(http.server.BaseHTTPRequestHandler):
    """One connection; each request is routed by method and path."""

    protocol_version = "HTTP/1.1"
    server_version, sys_version = "uvicorn", ""
    server: HttpServer

    def do_GET(self) -> None:
        """GET routes."""
        self._dispatch("GET")

    def do_POST(self) -> None:
        """POST routes."""
        self._dispatch("POST")

    def _routes(self) -> dict[tuple[str, str], object]:
        cfg = self.server.cfg
        routes = {("GET", "/health"): self._health, ("GET", "/metrics"): self._metrics,
                  ("GET", "/v1/models"): self._models}
        if cfg.pooling:
            routes["POST", "/v1/embeddings"] = lambda: self._generate("embed")
        else:
            routes["POST", "/v1/completions"] = lambda: self._generate("generate")
        if cfg.dev_mode:
            routes.update({("POST", "/sleep"): self._sleep, ("POST", "/wake_up"): self._wake_up,
                           ("GET", "/is_sleeping"): self._is_sleeping})
        return routes

    def _dispatch(self, method: str) -> None:
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path, _, query = self.path.partition("?")
        self.query = parse_qs(query)
        if path.startswith("/metrics"):
            path = "/metrics"  # vLLM mounts the exporter on the whole /metrics prefix
        with self.server.idle:
            self.server.busy += 1
        try:
            if path.startswith(GUARDED) and not self._authorized():
                return self._reply(401, {"error": "Unauthorized"})
            routes = self._routes()
            handler = routes.get((method, path))
            if handler is None:
                known = any(p == path for _, p in routes)
                return self._reply(405 if known else 404,
                                   {"detail": "Method Not Allowed" if known else "Not Found"})
            try:
                handler()
            except openai.ApiError as exc:
                self._reply(exc.code, exc.body())
            except EngineDead:
                self._reply(500, openai.engine_dead().body())
        finally:
            with self.server.idle:
                self.server.busy -= 1
                self.server.idle.notify_all()

    def _authorized(self) -> bool:
        keys = self.server.cfg.api_keys
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        return not keys or (scheme.lower() == "bearer" and token in keys)

    def _health(self) -> None:
        self._reply(200 if self.server.engine.alive() else 503, None)

    def _metrics(self) -> None:
        self._reply(200, self.server.metrics.render().encode(), CONTENT_TYPE)

    def _models(self) -> None:
        cfg = self.server.cfg
        self._reply(200, {"object": "list", "data": [{
            "id": name, "object": "model", "created": int(time.time()), "owned_by": "vllm",
            "root": cfg.model, "parent": None, "max_model_len": 2048, "permission": []}
            for name in cfg.served_names or [cfg.model]]})

    def _generate(self, kind: str) -> None:
        """A completion or an embedding: one engine request per prompt, all waited for."""
        cfg = self.server.cfg
        req, counts = openai.parse(self.body, cfg, "prompt" if kind == "generate" else "input")
        tokens = openai.max_tokens(req) if kind == "generate" else 0
        time.sleep(cfg.request_s)  # FAKE_VLLM_REQUEST_S: the API server's own time
        if not self.server.engine.alive():
            raise EngineDead()
        pending = [self.server.client.generate(kind, n, tokens) for n in counts]
        outs = [p.wait() for p in pending]
        build = openai.completion if kind == "generate" else openai.embeddings
        self._reply(200, build(cfg.served_name, outs))

    def _sleep(self) -> None:
        try:
            level = int(self.query.get("level", ["1"])[0])
        except ValueError:
            level = -1
        mode = self.query.get("mode", ["abort"])[0]
        if not 0 <= level <= 2 or mode not in PAUSE_MODES:
            raise openai.ApiError(400, "1 validation error:\n  query.level must be 0, 1 or 2 "
                                       "and query.mode abort, wait or keep", param="query")
        self._call("sleep", level=level, mode=mode)
        self.server.metrics.record_sleep_state(True, level)
        self._reply(200, {"status": "sleeping", "level": level})

    def _wake_up(self) -> None:
        tags = self.query.get("tags") or None
        log("INFO", f"wake up the engine with tags: {tags}", "api_router.py")
        awake = self._call("wake_up", tags=tags)
        if awake:
            self.server.metrics.record_sleep_state(False, 0)
        self._reply(200, {"status": "awake" if awake else "sleeping", "tags": tags})

    def _is_sleeping(self) -> None:
        self._reply(200, {"is_sleeping": self._call("is_sleeping")})

    def _call(self, method: str, **args):
        if not self.server.engine.alive():
            raise EngineDead()
        answer = self.server.client.call(method, **args).wait()
        if answer["error"]:
            raise openai.ApiError(500, answer["error"], "InternalServerError")
        return answer["value"]

    def _reply(self, code: int, obj, content_type: str = "application/json") -> None:
        data = obj if isinstance(obj, bytes) else b"" if obj is None else \
            json.dumps(obj, separators=(",", ":")).encode()  # compact, as Starlette writes it
        try:
            self.send_response(code)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the client gave up waiting

    def log_request(self, code="-", size="-") -> None:
        """Access line in uvicorn's format, on stdout."""
        host, port = self.client_address[:2]
        code = int(code)
        emit(f'INFO:     {host}:{port} - "{self.requestline}" {code} {HTTPStatus(code).phrase}')

    def log_message(self, format, *args) -> None:
        """Anything else http.server reports is a warning."""
        emit("WARNING:  " + format % args, err=True)
