"""The ASGI app (Starlette): routes, API-key check, and errors in each API's own JSON shape."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from . import anthropic, openai
from .common import APIError, ServerConfig
from .cli import DEFAULT_MAX_BODY
from .engine import Engine, release_memory

# A request body this large is given back to the OS once answered: glibc keeps what a 15 MB body, its JSON
# and its text freed (in a long-running process whose malloc has raised its mmap threshold: 100+ MB), even
# for a request refused before the engine (whose own jobs trim after growth).
TRIM_AFTER_BODY = 4 << 20


class Server:
    """What the handlers share: the model, its engine (the one worker thread) and the settings."""

    def __init__(self, model, cfg: ServerConfig):
        self.model = model
        self.cfg = cfg
        self.engine = Engine(model)
        self.defaults = model.default_sampling()
        if model.tokenizer is not None:  # loaded now, not at the first request
            model.tokenizer.min_tokens("")  # which works out the tokenizer's longest token once
        self.created = int(time.time())


def _is_anthropic(request: Request) -> bool:
    return request.url.path.startswith("/v1/messages") or (
        request.url.path.startswith("/v1/models") and "anthropic-version" in request.headers
    )


def error_response(request: Request, err: APIError) -> JSONResponse:
    body = anthropic.error_body(err) if _is_anthropic(request) else openai.error_body(err)
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(body, status_code=err.status, headers=headers)


def _authorized(request: Request, key: str) -> bool:
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else None
    if given is None:
        given = request.headers.get("x-api-key")
    return given is not None and hmac.compare_digest(given.encode(), key.encode())


def create_app(
    model,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    max_tokens_limit: int | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
) -> Starlette:
    """The server for one loaded flashmoe.Model. model_name: the id clients use (default: the model
    directory's name); api_key: required of every request but /health; max_tokens_limit: the largest
    max_tokens a request may ask for (default: the context length); max_body_bytes: the largest request."""
    cfg = ServerConfig(
        model_name=model_name or os.path.basename(os.path.normpath(model.path)),
        max_tokens_limit=int(max_tokens_limit or model.context_length),
        max_body_bytes=int(max_body_bytes),
        api_key=api_key or None,
    )
    server = Server(model, cfg)

    def endpoint(fn, auth: bool = True):
        async def handler(request: Request):
            length = request.headers.get("content-length", "")
            try:
                return await answer(request)
            finally:
                if length.isdigit() and int(length) >= TRIM_AFTER_BODY:
                    await asyncio.to_thread(release_memory)  # the body and its JSON are freed by now

        async def answer(request: Request):
            try:
                if auth and cfg.api_key is not None and not _authorized(request, cfg.api_key):
                    raise APIError(
                        401,
                        "invalid or missing API key (send 'Authorization: Bearer KEY' or 'x-api-key: KEY')",
                        code="invalid_api_key",
                    )
                return await fn(server, request)
            except APIError as err:
                return error_response(request, err)

        return handler

    async def health(server, request):
        eng = server.engine
        return JSONResponse(
            {
                "status": "ok",
                "model": cfg.model_name,
                "busy": eng.busy,
                "queued": eng.queued,
                "requests": dict(eng.counts),
            }
        )

    async def models(server, request):
        if _is_anthropic(request):
            return JSONResponse(
                {
                    "data": [_anthropic_card(server)],
                    "has_more": False,
                    "first_id": cfg.model_name,
                    "last_id": cfg.model_name,
                }
            )
        return JSONResponse(openai.models_list(server))

    async def model_info(server, request):
        name = request.path_params["name"]
        if name != cfg.model_name:
            raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return JSONResponse(_anthropic_card(server) if _is_anthropic(request) else openai.model_card(server))

    def _anthropic_card(server):
        return {
            "type": "model",
            "id": cfg.model_name,
            "display_name": cfg.model_name,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(server.created)),
        }

    async def http_error(request: Request, exc: HTTPException):
        messages = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed here"}
        return error_response(
            request, APIError(exc.status_code, messages.get(exc.status_code, str(exc.detail)))
        )

    async def server_error(request: Request, exc: Exception):
        return error_response(request, APIError(500, f"internal error: {type(exc).__name__}: {exc}"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.engine.close()

    routes = [
        Route("/health", endpoint(health, auth=False), methods=["GET"]),
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/v1/models/{name:path}", endpoint(model_info), methods=["GET"]),
        Route("/v1/chat/completions", endpoint(openai.chat_completions), methods=["POST"]),
        Route("/v1/completions", endpoint(openai.completions), methods=["POST"]),
        Route("/v1/messages", endpoint(anthropic.messages), methods=["POST"]),
        Route("/v1/messages/count_tokens", endpoint(anthropic.count_tokens), methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )
    app.state.server = server
    return app
