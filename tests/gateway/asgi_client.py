"""Drive an ASGI app by hand: one request whose client disconnects exactly when the test says."""

from __future__ import annotations

import json
from typing import Any

import anyio


class Client:
    """Sends one request, records what comes back, and disconnects when told."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = json.dumps(body).encode()
        self.body_sent = False
        self.gone = anyio.Event()
        self.got_content = anyio.Event()
        self.messages: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        if not self.body_sent:
            self.body_sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        if message["type"] == "http.response.body" and b'"content":"alpha' in message.get("body", b""):
            self.got_content.set()


def scope(path: str) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 5),
            "server": ("test", 80)}
