"""gateway: a ksdk engine as an OpenAI-compatible Starlette app.

    app = gateway.create_app(engine)                     # /v1/models, /v1/chat/completions, /v1/completions,
    parent = Starlette(routes=[Mount("/llm", app=app)],  # /health, /metrics -- under any prefix
                       lifespan=gateway.lifespan(engine))
"""

from gateway.app import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CONCURRENCY, create_app, lifespan
from gateway.errors import APIError

__all__ = ["APIError", "DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_CONCURRENCY", "create_app", "lifespan"]
