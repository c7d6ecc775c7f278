"""Async driver: a Generator's step loop on one background thread, tokens streamed to asyncio callers.

    driver = AsyncDriver(generator)
    stream = driver.stream(GenerationRequest(prompt=ids, adapter="support"))
    async for token in stream:
        ...
    stream.result  # GenerationResult (finish reason, token counts)
    driver.close()

The model only ever runs on the driver's thread; asyncio code only submits and awaits. Tokens cross over
with loop.call_soon_threadsafe, so each stream sees its tokens in order, then its end.
"""

from __future__ import annotations

import asyncio
import threading
import time

from adalora.engine.errors import EngineError
from adalora.engine.scheduler import GenerationRequest, GenerationResult, Generator, Handle

_END = object()
GATHER_MAX_S = 0.025
"""The longest an idle driver gathers a burst of requests before its first step (see AsyncDriver)."""


class TokenStream:
    """Async iterator over one request's generated token ids; `.result` once it is exhausted."""

    def __init__(self, handle_queue: asyncio.Queue, handle: Handle) -> None:
        self._queue = handle_queue
        self.handle = handle

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> int:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # stay exhausted
            if self.handle.error is not None:
                raise self.handle.error
            raise StopAsyncIteration
        return item

    @property
    def result(self) -> GenerationResult | None:
        return self.handle.result


class AsyncDriver:
    """Owns the thread that calls `generator.step()` while any request waits or runs.

    An idle driver (no row running) that gets a request waits for more while they keep coming, each within
    `gather_s` of the one before (at most GATHER_MAX_S in all, or until they fill the batch), so that a burst
    prefills in one forward: without it, the first request prefills alone and the rest join a step later, one
    more forward of the whole model. A lone request waits `gather_s` once; 0 turns it off."""

    def __init__(self, generator: Generator, gather_s: float = 0.004) -> None:
        if isinstance(gather_s, bool) or not isinstance(gather_s, (int, float)) or not 0 <= gather_s <= GATHER_MAX_S:
            raise EngineError(f"gather_s must be a number of seconds in [0, {GATHER_MAX_S}], got {gather_s!r}")
        self.generator = generator
        self.gather_s = float(gather_s)
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="adalora-generate", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._closed:
            if not self.generator.has_work():
                self._wake.wait()
                self._wake.clear()
                self._gather()
                continue
            try:
                self.generator.step()
            except Exception as error:  # every request in flight gets the error; the loop goes on
                self.generator.fail_all(error)

    def _gather(self) -> None:
        """After an idle wait: while no row runs, wait for requests as long as each comes within gather_s of the
        last (see the class)."""
        if self.gather_s <= 0 or self.generator.running:
            return
        end = time.monotonic() + GATHER_MAX_S
        while not self._closed and self.generator.waiting < self.generator.config.max_batch_size:
            left = min(self.gather_s, end - time.monotonic())
            if left <= 0 or not self._wake.wait(left):
                return
            self._wake.clear()

    def stream(self, request: GenerationRequest, deadline: float | None = None) -> TokenStream:
        """Submit `request` (validation errors raise here) and stream its tokens; call from a running event loop.
        Still waiting for a batch row at time.monotonic() `deadline`, it ends with DeadlineExpired unrun."""
        if self._closed:
            raise EngineError("this driver is closed; create a new AsyncDriver")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        handle = self.generator.submit(request,
                                       on_token=lambda t: loop.call_soon_threadsafe(queue.put_nowait, t),
                                       on_finish=lambda h: loop.call_soon_threadsafe(queue.put_nowait, _END),
                                       deadline=deadline)
        self._wake.set()
        return TokenStream(queue, handle)

    @property
    def alive(self) -> bool:
        """Whether the stepping thread runs (False once closed, or had it died)."""
        return not self._closed and self._thread.is_alive()

    def cancel(self, stream: TokenStream) -> None:
        """Stop `stream`'s request at the next step boundary: its batch row is freed and the stream ends with
        RequestCancelled (a request already done is left as it is)."""
        self.generator.cancel(stream.handle)
        self._wake.set()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """The whole completion at once."""
        stream = self.stream(request)
        async for _ in stream:
            pass
        return stream.result

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop the loop after the step in progress (requests still in flight are not finished)."""
        self._closed = True
        self._wake.set()
        self._thread.join(timeout)
