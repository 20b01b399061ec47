"""`flashmoe serve MODEL`: the OpenAI- and Anthropic-compatible HTTP server."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys

DEFAULT_MAX_BODY = 16 * 1024 * 1024  # 16 MiB


def add_serve_command(sub) -> None:
    s = sub.add_parser("serve", help="serve a model over HTTP: OpenAI and Anthropic compatible APIs")
    s.add_argument("model", help="packed model directory (flashmoe convert)")
    s.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    s.add_argument(
        "--api-key",
        default=os.environ.get("FLASHMOE_API_KEY"),
        help="require this key ('Authorization: Bearer KEY' or 'x-api-key: KEY'; "
        "default $FLASHMOE_API_KEY, else none)",
    )
    s.add_argument("--model-name", help="the model id clients send (default: the model directory's name)")
    s.add_argument("--memory-budget", help="memory for the engine, e.g. 40GB (default: half of RAM)")
    s.add_argument(
        "--context-length", type=int, help="tokens of context (default: the model's, at most 4096)"
    )
    s.add_argument("--threads", type=int, help="compute threads (default: one per core)")
    s.add_argument(
        "--prompt-cache", type=int, default=4, help="prompt states kept for reuse across requests (default 4)"
    )
    s.add_argument(
        "--max-tokens-limit",
        type=int,
        help="largest max_tokens a request may ask for (default: the context length)",
    )
    s.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY,
        help=f"largest request body (default {DEFAULT_MAX_BODY} bytes)",
    )
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    s.set_defaults(func=cmd_serve)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args) -> int:
    import uvicorn

    from ..model import load
    from .app import create_app

    for name in ("max_tokens_limit", "max_body_bytes", "context_length", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    opts = {
        k: v
        for k, v in (
            ("memory_budget", args.memory_budget),
            ("context_length", args.context_length),
            ("threads", args.threads),
        )
        if v is not None
    }
    model = load(args.model, prompt_cache=args.prompt_cache, **opts)
    if model.tokenizer is None:
        print(
            f"flashmoe serve: warning: {args.model} has no tokenizer.json; only /v1/completions with token "
            f"ids will work",
            file=sys.stderr,
        )
    app = create_app(
        model,
        model_name=args.model_name,
        api_key=args.api_key,
        max_tokens_limit=args.max_tokens_limit,
        max_body_bytes=args.max_body_bytes,
    )
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.create_server((args.host, args.port), family=family, reuse_port=False)
    port = sock.getsockname()[1]
    shown = f"[{args.host}]" if family == socket.AF_INET6 else args.host
    name = app.state.server.cfg.model_name
    print(
        f"flashmoe serve: {name} ({model.architecture}, context {model.context_length}) at "
        f"http://{shown}:{port}/v1  (OpenAI: /v1/chat/completions, /v1/completions; Anthropic: /v1/messages)",
        flush=True,
    )
    if not _loopback(args.host) and not args.api_key:
        print("flashmoe serve: warning: listening beyond this machine without --api-key", file=sys.stderr)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
