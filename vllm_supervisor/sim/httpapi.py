"""The simulated API server's HTTP side: /health, /v1/models, /v1/completions, with
uvicorn-style access lines."""

from __future__ import annotations

import http.server
import itertools
import json
import socket
import socketserver
import time
from http import HTTPStatus

from vllm_supervisor.sim.config import Config
from vllm_supervisor.sim.plumbing import Child, emit


class HttpServer(http.server.ThreadingHTTPServer):
    allow_reuse_address = True  # SO_REUSEADDR, so a restart can rebind at once
    daemon_threads = True

    def __init__(self, cfg: Config, engine: Child):
        self.cfg, self.engine, self.ids = cfg, engine, itertools.count(1)
        self.address_family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        super().__init__((cfg.host, cfg.port), Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would resolve the host name (slow without DNS): skip it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.cfg.host), self.server_address[1]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version, sys_version = "uvicorn", ""
    server: HttpServer

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
