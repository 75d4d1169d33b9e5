"""The ``ksdk`` command: options reach the engine and the app; chat and generate print what streams."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import ksdk.cli
from ksdk.testing import tiny_gguf
from tests.gateway.fake_engine import FakeEngine

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"



@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Engine.from_gguf replaced by a FakeEngine; what it was called with is recorded."""
    seen: dict[str, Any] = {"engine": FakeEngine()}

    def from_gguf(path: Path, **options: Any) -> FakeEngine:
        seen["path"], seen["options"] = path, options
        return seen["engine"]

    monkeypatch.setattr("ksdk.engine.Engine.from_gguf", from_gguf)
    yield seen


def test_python_dash_m_runs_the_cli() -> None:
    out = subprocess.run([sys.executable, "-m", "ksdk", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "serve" in out.stdout and "generate" in out.stdout


def test_serve_without_a_gguf_uses_the_demo_and_says_its_text_is_random(
        fake: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    served: dict[str, Any] = {}
    monkeypatch.setattr("ksdk.testing.demo_model_path", lambda: Path("/cache/demo.gguf"))
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: served.update(app=app, **kw))
    code = ksdk.cli.main(["serve", "--port", "9123", "--api-key", "k", "--max-concurrency", "3",
                          "--kv-cache-tokens", "512", "--no-prefix-caching", "--model-name", "demo", "--quiet",
                          "--experts", "native", "--expert-threads", "3", "--cuda-graphs", "attention",
                          "--gpu-expert-memory", "1.5GiB"])
    assert code == 0
    err = capsys.readouterr().err
    assert "RANDOM" in err and "text is random" in err and "http://127.0.0.1:9123/v1" in err
    assert fake["path"] == Path("/cache/demo.gguf")
    assert fake["options"] == {"model_id": "demo", "device": "auto", "max_model_len": None, "kv_cache_tokens": 512,
                               "page_size": 16, "max_num_seqs": 64, "max_batch_tokens": 2048, "max_waiting": 256,
                               "enable_prefix_caching": False, "experts": "native", "expert_threads": 3,
                               "expert_memory": "mmap", "gpu_stream_threshold": None,
                               "gpu_expert_memory": 3 * 2**29, "cuda_graphs": "attention"}
    assert (served["host"], served["port"], served["log_level"]) == ("127.0.0.1", 9123, "warning")
    state = served["app"].state.gateway
    assert (state.api_key, state.max_concurrency, state.engine) == ("k", 3, fake["engine"])


def test_a_size_that_is_not_one_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        ksdk.cli.main(["serve", "--gpu-expert-memory", "lots"])
    assert exc.value.code == 2 and "'lots' is not a size" in capsys.readouterr().err


async def test_served_app_answers(fake: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    served: dict[str, Any] = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: served.update(app=app))
    ksdk.cli.main(["serve", "model.gguf", "--quiet"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(served["app"]), base_url="http://t") as http:
        assert (await http.get("/v1/models")).json()["data"][0]["id"] == "fake-r1"


def test_chat_keeps_history_resets_and_survives_errors(fake: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    engine: FakeEngine = fake["engine"]
    lines = iter(["hi", "", "more", "/reset", "busy now", "again", "/exit"])

    def typed(prompt: str = "") -> str:
        line = next(lines)
        engine.busy = line == "busy now"
        return line

    monkeypatch.setattr("builtins.input", typed)
    assert ksdk.cli.main(["chat", "m.gguf", "--system", "be brief", "--max-tokens", "7", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.count("[thinking] Let me think. ") == 3 and out.count("alpha beta gamma delta ") == 3
    assert "error: the waiting queue is full" in out
    histories = [messages for kind, messages, _ in engine.calls]
    answer = "alpha beta gamma delta "
    assert histories[1] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                            {"role": "assistant", "content": answer}, {"role": "user", "content": "more"}]
    assert histories[3] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "again"}]
    assert engine.calls[0][2] == {"max_tokens": 7, "temperature": 0.6}
    assert engine.state.name == "CLOSED"


def test_generate_prints_the_stream(fake: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert ksdk.cli.main(["generate", "m.gguf", "Once", "--max-tokens", "3", "--seed", "4", "--quiet"]) == 0
    assert capsys.readouterr().out == "alpha beta gamma \n"
    assert fake["engine"].calls == [("generate", "Once", {"max_tokens": 3, "temperature": 0.0, "seed": 4})]


def test_generate_on_the_tiny_model_shows_loading_progress(capsys: pytest.CaptureFixture[str]) -> None:
    path = tiny_gguf()
    assert ksdk.cli.main(["generate", str(path), "Once upon a time", "--max-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert f"loading {path}" in captured.err and "loaded " in captured.err
    assert captured.out.endswith("\n") and len(captured.out) > 1


def test_engine_from_gguf_sets_the_cuda_graph_mode_or_names_the_allowed_ones() -> None:
    from ksdk.engine import Engine
    from ksdk.errors import InvalidRequestError

    engine = Engine.from_gguf(tiny_gguf(), device="cpu", cuda_graphs="off")
    assert engine._model.cuda_graphs == "off"  # type: ignore[attr-defined]
    with pytest.raises(InvalidRequestError, match="step, attention, off"):
        Engine.from_gguf(tiny_gguf(), device="cpu", cuda_graphs="always")


def test_errors_are_reported_with_exit_code_2(fake: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert ksdk.cli.main(["generate", "m.gguf", "x", "--max-tokens", "100000", "--quiet"]) == 2
    assert "ksdk: error:" in capsys.readouterr().err


@pytest.mark.slow
def test_ksdk_serve_in_a_subprocess() -> None:
    import socket
    import time

    import openai

    with socket.socket() as s:  # a free port (released for the server a moment later)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "ksdk", "serve", str(tiny_gguf()), "--port", str(port),
                               "--model-name", "tiny", "--api-key", "k", "--quiet"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            assert time.monotonic() < deadline, "ksdk serve did not become healthy in 120 s"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        client = openai.OpenAI(api_key="k", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=3)
        assert reply.usage is not None and reply.usage.completion_tokens == 3
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=30)
    # uvicorn shuts down gracefully on SIGTERM (closing the engine), then re-raises the signal
    assert server.returncode in (0, -15) and "Traceback" not in output, output
