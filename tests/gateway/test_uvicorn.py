"""The gateway once through real uvicorn on 127.0.0.1, with the fake engine (the real one: test_real_engine)."""

from __future__ import annotations

import time

import httpx
import openai

import gateway
from tests.gateway.fake_engine import FakeEngine
from tests.gateway.serving import uvicorn_server


def test_openai_client_through_uvicorn() -> None:
    engine = FakeEngine(token_delay=0.002, max_model_len=4096)
    app = gateway.create_app(engine, api_key="k", close_engine=True)  # type: ignore[arg-type]
    with uvicorn_server(app) as url:
        assert engine.state.name == "RUNNING"  # the app's own lifespan started it
        client = openai.OpenAI(api_key="k", base_url=f"{url}/v1", max_retries=0, timeout=10)
        assert [m.id for m in client.models.list().data] == ["fake-r1"]
        reply = client.chat.completions.create(model="fake-r1", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens == 15  # type: ignore[union-attr]
        stream = client.chat.completions.create(model="fake-r1", messages=[{"role": "user", "content": "hi"}],
                                                stream=True, max_tokens=6)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "alpha beta gamma "
        try:
            client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
        except openai.NotFoundError as exc:
            assert exc.body["code"] == "model_not_found"  # type: ignore[index]
        else:
            raise AssertionError("expected 404")

        # a client that closes the connection mid-stream: the engine request ends and frees its pages
        engine.token_delay, engine.answer_tokens = 0.01, 1000
        with httpx.Client(timeout=10) as http:
            body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 2000}
            with http.stream("POST", f"{url}/v1/chat/completions", json=body,
                             headers={"Authorization": "Bearer k"}) as r:
                assert r.status_code == 200, r.read()
                lines = r.iter_lines()
                while '"content":"alpha' not in next(lines):
                    pass
                assert engine.pages  # streaming: the request holds pages
        deadline = time.monotonic() + 5
        while engine.pages and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.pages == {} and engine.generated < 500
    assert engine.state.name == "CLOSED"  # close_engine=True: closed with the server
