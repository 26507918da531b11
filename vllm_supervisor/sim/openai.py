"""The OpenAI-style bodies of the simulated API server: what a request asks for, and
vLLM's shapes for completions, embeddings and errors (entrypoints/serve/engine/protocol.py
ErrorResponse: ``{"error": {"message", "type", "param", "code"}}``)."""

from __future__ import annotations

import json
import time
import uuid
from http import HTTPStatus

# vllm.v1.engine.exceptions.EngineDeadError's message (a VLLMServerError: HTTP 500)
ENGINE_DEAD = "EngineCore encountered an issue. See stack trace (above) for the root cause."
DEFAULT_MAX_TOKENS = 16  # CompletionRequest.max_tokens


class ApiError(Exception):
    """An error answer: status code and vLLM's ErrorResponse body."""

    def __init__(self, code: int, message: str, err_type: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param
        self.err_type = err_type or HTTPStatus(code).phrase

    def body(self) -> dict:
        """The JSON body vLLM sends with it."""
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param,
                          "code": self.code}}


def engine_dead() -> ApiError:
    """What a request gets once the engine is gone."""
    return ApiError(500, ENGINE_DEAD, "InternalServerError")


def parse(raw: bytes, cfg, field: str) -> tuple[dict, list[int]]:
    """The request body and the prompt token count of each of its inputs (``field``:
    "prompt" or "input"); ApiError 400 when malformed, 404 for another model's name."""
    try:
        req = json.loads(raw or b"{}")
    except ValueError:
        raise ApiError(400, "1 validation error:\n  JSON decode error", param="body") from None
    if not isinstance(req, dict) or field not in req:
        raise ApiError(400, f"1 validation error:\n  body.{field}: Field required",
                       param=f"body.{field}")
    model = req.get("model")
    if model and model not in (cfg.served_names or [cfg.model]):
        names = ", ".join(cfg.served_names or [cfg.model])
        raise ApiError(404, f"The model `{model}` does not exist. Valid aliases: {names}.",
                       "NotFoundError", "model")
    value = req[field]
    if isinstance(value, str) or (isinstance(value, list) and value
                                  and all(isinstance(t, int) for t in value)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"{field} must be a string, a list of strings or token ids",
                       "BadRequestError", field)
    counts = []
    for item in value:
        if isinstance(item, str):
            counts.append(max(1, len(item.split())))
        elif isinstance(item, list) and all(isinstance(t, int) for t in item):
            counts.append(max(1, len(item)))
        else:
            raise ApiError(400, f"{field} must be a string, a list of strings or token ids",
                           "BadRequestError", field)
    return req, counts


def max_tokens(req: dict) -> int:
    """The request's max_tokens (400 when it is not a positive integer)."""
    value = req.get("max_tokens")
    if value is None:
        return DEFAULT_MAX_TOKENS
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {value}.", "BadRequestError",
                       "max_tokens")
    return value


def completion(model: str, outs: list[dict]) -> dict:
    """A text_completion body from the engine's outputs (one per prompt)."""
    prompt = sum(o["prompt"] for o in outs)
    tokens = sum(o["tokens"] for o in outs)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
        "created": int(time.time()), "model": model,
        "choices": [{"index": i, "text": " simulated" * min(o["tokens"], 4), "logprobs": None,
                     "finish_reason": o["finish"], "stop_reason": None}
                    for i, o in enumerate(outs)],
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt + tokens,
                  "completion_tokens": tokens, "prompt_tokens_details": None},
    }


def embeddings(model: str, outs: list[dict]) -> dict:
    """An embeddings body from the engine's outputs (one per input)."""
    prompt = sum(o["prompt"] for o in outs)
    return {
        "id": f"embd-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
        "model": model,
        "data": [{"index": i, "object": "embedding",
                  "embedding": [] if o["finish"] == "abort" else
                  [round(0.125 * ((i + k) % 8) - 0.5, 3) for k in range(8)]}
                 for i, o in enumerate(outs)],
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt, "completion_tokens": 0,
                  "prompt_tokens_details": None},
    }
