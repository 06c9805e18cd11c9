"""A small OpenAI-compatible chat completions server over asyncio streams, for
tests of remote provider pools: real HTTP on loopback, SSE streaming with a
usage chunk and [DONE], bearer key checked. The answer is "remote says: "
followed by the last user message; model names script failures:
"fail-500" answers 500, "rate-limited" 429, "hang-up" closes mid-stream."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field


@dataclass
class OpenAICompatibleServer:
    api_key: str
    port: int = 0
    requests: list[dict[str, object]] = field(default_factory=list)
    authorizations: list[str] = field(default_factory=list)
    _server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            lines = head.split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            body = json.loads(await reader.readexactly(int(headers.get("content-length", "0"))) or b"{}")
            self.authorizations.append(headers.get("authorization", ""))
            if headers.get("authorization") != f"Bearer {self.api_key}":
                await self._reply(writer, 401, {"error": {"message": "bad key", "type": "invalid_request_error"}})
                return
            if (method, path) != ("POST", "/v1/chat/completions"):
                await self._reply(writer, 404, {"error": {"message": "not found"}})
                return
            self.requests.append(body)
            model = str(body.get("model"))
            if model == "fail-500":
                await self._reply(writer, 500, {"error": {"message": "boom"}})
                return
            if model == "rate-limited":
                await self._reply(writer, 429, {"error": {"message": "slow down"}})
                return
            await self._stream(writer, body, hang_up=model == "hang-up")
        finally:
            writer.close()

    async def _reply(self, writer: asyncio.StreamWriter, status: int, payload: dict[str, object]) -> None:
        data = json.dumps(payload).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n"
            "connection: close\r\n\r\n".encode()
            + data
        )
        await writer.drain()

    async def _stream(self, writer: asyncio.StreamWriter, body: dict[str, object], hang_up: bool) -> None:
        messages = body.get("messages") or []
        last = str(messages[-1]["content"]) if isinstance(messages, list) and messages else ""
        words = ["remote ", "says: ", *[w + " " for w in last.split()]]
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")

        def event(payload: dict[str, object] | str) -> bytes:
            return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()

        base = {"id": "chatcmpl-remote", "object": "chat.completion.chunk", "created": 1, "model": body.get("model")}
        writer.write(event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}))
        for i, word in enumerate(words):
            if hang_up and i == 2:
                await writer.drain()
                return
            writer.write(event({**base, "choices": [{"index": 0, "delta": {"content": word}}]}))
            await writer.drain()
        writer.write(event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
        usage = {"prompt_tokens": 7, "completion_tokens": len(words), "total_tokens": 7 + len(words)}
        writer.write(event({**base, "choices": [], "usage": usage}))
        writer.write(event("[DONE]"))
        await writer.drain()
