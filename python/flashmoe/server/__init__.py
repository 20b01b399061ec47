"""`flashmoe serve`: an OpenAI- and Anthropic-compatible HTTP server for one model.

create_app(model, ...) is the ASGI app (Starlette; run it with uvicorn); the engine runs requests one
at a time, in arrival order, on a worker thread, so the event loop never waits on the model."""

from .cli import add_serve_command


def create_app(model, **options):
    """The ASGI app serving a loaded flashmoe.Model (options: see app.create_app)."""
    from .app import create_app as _create

    return _create(model, **options)


__all__ = ["add_serve_command", "create_app"]
