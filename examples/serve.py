"""Serve a model as an OpenAI-compatible API from Python: what ``ksdk serve`` does, in a few lines.

    python examples/serve.py [MODEL.gguf]       # then: python examples/openai_client.py

Without a GGUF it uses the built-in demo model (random weights: the text is random).
"""

from __future__ import annotations

import sys
from pathlib import Path

import uvicorn

import gateway
import ksdk
from ksdk.testing import demo_model_path

if __name__ == "__main__":
    model = Path(sys.argv[1]) if len(sys.argv) > 1 else demo_model_path()
    engine = ksdk.Engine.from_gguf(model, max_model_len=4096)
    # The app starts the engine with uvicorn's lifespan and, as it owns it here, closes it at shutdown.
    app = gateway.create_app(engine, api_key=None, max_concurrency=32, close_engine=True)
    uvicorn.run(app, host="127.0.0.1", port=8000)
