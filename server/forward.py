"""What a front with many replicas needs that is not Ray's: the adapter a request should land next to (route_key),
and one HTTP request run through an in-process ASGI app with its answer streamed back (exchange). server.ray_app
puts them on Ray Serve: the ingress reads route_key, each replica runs `exchange` over the OpenAI HTTP API
(server.http), so every route, check and error is the one `adalora serve` answers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message

from adalora.engine.errors import InvalidRequest
from adalora.server.store import check_id

ADAPTER_FIELDS = ("lora_name", "model")
"""Body fields naming one adapter, in the order they are read: the admin routes' lora_name, then a request's model."""

DISCONNECT_GRACE_S = 1.0
"""Seconds an app gets to end by itself once told the client left, before its task is cancelled."""


def _valid_id(value: object) -> str:
    try:
        return check_id(value)
    except InvalidRequest:
        return ""


def route_key(body: bytes, base_name: str) -> str:
    """The adapter id a request is routed by, '' for none (the base model, a body that is not JSON, an id that is not
    a valid store id: those go to any replica, which answers them as `adalora serve` would). A weighted mix routes
    by its heaviest adapter (ties: the smallest id), so it tends to run where its main adapter is already loaded."""
    try:
        payload = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return ""
    if not isinstance(payload, dict):
        return ""
    mix = payload.get("adapters")
    if isinstance(mix, dict) and mix:
        weights = [(abs(w), i) for i, w in mix.items() if isinstance(w, (int, float)) and not isinstance(w, bool)]
        heaviest = min(weights, key=lambda t: (-t[0], t[1]), default=(0, ""))[1]
        return _valid_id(heaviest)
    for name in ADAPTER_FIELDS:
        value = payload.get(name)
        if isinstance(value, str) and value != base_name:
            return _valid_id(value)
    return ""


@dataclass(frozen=True)
class HttpCall:
    """One HTTP request as it crosses to a replica: plain values only (pickled by Ray)."""

    method: str
    path: str
    query: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""


@dataclass
class Head:
    """The answer's status and headers, sent with its first body bytes (a non-streamed answer arrives whole)."""

    status: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""


def scope_of(call: HttpCall) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": call.method, "scheme": "http", "path": call.path, "raw_path": call.path.encode(),
            "query_string": call.query, "root_path": "", "headers": list(call.headers),
            "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80)}


async def exchange(app: ASGIApp, call: HttpCall, extra_headers: Sequence[tuple[bytes, bytes]] = ()) \
        -> AsyncIterator[Head | bytes]:
    """Run `call` through `app`: yields one Head (status, headers + extra_headers, the first body bytes), then the
    rest of the body as it comes. Closing the iterator early is the client going away: the app's receive() says
    http.disconnect, and its task is cancelled DISCONNECT_GRACE_S later if it has not ended."""
    queue: asyncio.Queue[Message | BaseException | None] = asyncio.Queue()
    gone = asyncio.Event()
    sent_body = False

    async def receive() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": call.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await queue.put(message)

    async def run() -> None:
        try:
            await app(scope_of(call), receive, send)
        except Exception as error:  # noqa: BLE001 - handed to the reader
            await queue.put(error)
        finally:
            await queue.put(None)

    task = asyncio.ensure_future(run())
    head: Head | None = None
    try:
        while True:
            message = await queue.get()
            if isinstance(message, BaseException):
                raise message
            if message is None:
                if head is not None:  # an app that ended without a body message
                    yield head
                return
            if message["type"] == "http.response.start":
                head = Head(message["status"], list(message.get("headers", [])) + list(extra_headers))
            elif message["type"] == "http.response.body":
                chunk, more = message.get("body", b""), message.get("more_body", False)
                if head is not None:
                    head.body = chunk
                    yield head
                    head = None
                elif chunk:
                    yield chunk
                if not more:
                    return
    finally:
        gone.set()  # the app's receive() says http.disconnect: it may stop by itself
        await asyncio.wait([task], timeout=DISCONNECT_GRACE_S)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
