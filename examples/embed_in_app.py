"""Mount the OpenAI-compatible API into an existing Starlette (or FastAPI) app, under /llm.

    python examples/embed_in_app.py [MODEL.gguf]
    curl http://127.0.0.1:8000/                 # the app's own route
    curl http://127.0.0.1:8000/llm/v1/models    # the gateway, under the prefix

Starlette's Mount does not run a mounted app's lifespan, so the parent starts and closes the engine with
``gateway.lifespan(engine)``. (Without it the gateway would start the engine on its first request.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

import gateway
import ksdk
from ksdk.testing import demo_model_path


def build_app(engine: ksdk.Engine) -> Starlette:
    async def home(request: Request) -> JSONResponse:
        return JSONResponse({"app": "my service", "llm": str(request.url_for("llm", path="/v1/models"))})

    return Starlette(
        routes=[Route("/", home), Mount("/llm", app=gateway.create_app(engine, api_key=None), name="llm")],
        lifespan=gateway.lifespan(engine),
    )


if __name__ == "__main__":
    model = Path(sys.argv[1]) if len(sys.argv) > 1 else demo_model_path()
    uvicorn.run(build_app(ksdk.Engine.from_gguf(model)), host="127.0.0.1", port=8000)
