"""The adalora.v1.AdaLora servicer: each RPC is convert.from_pb -> Backend -> convert.to_pb, and every error
leaves through `abort_with`, which picks its status code from server.errors.STATUS. Every RPC runs inside
`answered`, which records its status and latency in the server's Metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from contextlib import aclosing, asynccontextmanager

import grpc

from adalora.server import convert
from adalora.server.auth import check_admin
from adalora.server.backend import Backend
from adalora.server.domain import GenerateCall, TokenDelta
from adalora.server.config import ServerConfig
from adalora.server.errors import ResponseTooLarge, redactor, status_of
from adalora.server.gate import Gate
from adalora.server.gen.adalora.v1 import adalora_pb2 as pb
from adalora.server.gen.adalora.v1 import adalora_pb2_grpc as pb_grpc
from adalora.server.metrics import Metrics

log = logging.getLogger("adalora.server")


async def abort_with(context: grpc.aio.ServicerContext, error: Exception,
                     redact: Callable[[str], str] = str) -> None:
    """End the RPC with the status of `error` and its message, the server's paths taken out (errors.redactor); an
    unexpected error is logged with its traceback here and reaches the client as INTERNAL without one."""
    code = status_of(error)
    message = redact(str(error))
    if code == grpc.StatusCode.INTERNAL:
        log.exception("internal error", exc_info=error)
        message = f"internal server error ({type(error).__name__}); the server log has the details"
    await context.abort(code, message)


@asynccontextmanager
async def answered(servicer: AdaLoraServicer, rpc: str, request, context: grpc.aio.ServicerContext):
    """Run one RPC: an error ends it through abort_with; its status and latency are recorded either way."""
    started = time.perf_counter()

    def record(status: grpc.StatusCode) -> None:
        servicer.metrics.rpc_done(rpc, servicer.named(request), status.name, time.perf_counter() - started)

    try:
        yield
    except Exception as error:  # noqa: BLE001 - every error becomes a status
        record(status_of(error))  # before abort sends the status: a client that then scrapes sees it counted
        await abort_with(context, error, servicer.redact)
    except (asyncio.CancelledError, GeneratorExit):  # the client went away
        record(grpc.StatusCode.CANCELLED)
        raise
    else:
        record(grpc.StatusCode.OK)


def fits(message, limit: int):
    """The answer, unless it is over `limit` bytes (--max-message-bytes): then ResponseTooLarge now, counted as what it
    is (gRPC itself would refuse it after the handler, and the metrics would have counted OK)."""
    if message is not None and message.ByteSize() > limit:
        raise ResponseTooLarge(f"the answer is {message.ByteSize()} bytes, over this server's limit of {limit} "
                               f"(--max-message-bytes); ask for less per request (fewer inputs or tokens)")
    return message


def unary(method):
    @functools.wraps(method)
    async def wrapper(self, request, context):
        async with answered(self, method.__name__, request, context):
            return self.fits(await method(self, request, context))
    return wrapper


def streaming(method):
    @functools.wraps(method)
    async def wrapper(self, request, context):
        async with answered(self, method.__name__, request, context):
            async for message in method(self, request, context):
                yield self.fits(message)
    return wrapper


def client_streaming(method):
    """A stream of requests, one answer: `method(self, first, rest, context)` gets the first message (None for an
    empty stream) and an async iterator of the others; it is recorded under the adapter the first one names."""
    @functools.wraps(method)
    async def wrapper(self, request_iterator, context):
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        async with answered(self, method.__name__, first, context):
            return await method(self, first, messages, context)
    return wrapper


class AdaLoraServicer(pb_grpc.AdaLoraServicer):
    """Answers UNAVAILABLE while the gate is closed (the Backend not attached yet, or draining)."""

    def __init__(self, config: ServerConfig, metrics: Metrics, gate: Gate) -> None:
        self.config, self.metrics, self.gate = config, metrics, gate
        self.redact = redactor(config)
        self.named = convert.named_adapter

    def fits(self, message):
        return fits(message, self.config.max_message_bytes)

    def _ready(self) -> Backend:
        return self.gate.ready()

    def _generate_call(self, request, context: grpc.aio.ServicerContext) -> GenerateCall:
        """The domain call, with the RPC's deadline (if any) as an absolute time.monotonic()."""
        call = convert.generate_from_pb(request, self.config)
        remaining = context.time_remaining()
        return call if remaining is None else dataclasses.replace(call, deadline=time.monotonic() + remaining)

    @unary
    async def Generate(self, request, context):
        backend = self._ready()
        return convert.completion_to_pb(await backend.complete(self._generate_call(request, context)))

    @streaming
    async def GenerateStream(self, request, context):
        backend = self._ready()
        call = self._generate_call(request, context)
        streamed = ""
        async with aclosing(backend.generate(call)) as events:
            async for event in events:
                yield convert.stream_to_pb(event, streamed)
                if isinstance(event, TokenDelta):
                    streamed += event.text

    @unary
    async def Classify(self, request, context):
        results = await self._ready().classify(convert.encode_from_pb(request))
        return pb.ClassifyResponse(results=[convert.classification_to_pb(r) for r in results])

    @unary
    async def Embed(self, request, context):
        embeddings = await self._ready().embed(convert.encode_from_pb(request, normalize=request.normalize))
        return convert.embeddings_to_pb(embeddings)

    @unary
    async def LoadAdapter(self, request, context):
        check_admin(self.config, context, "LoadAdapter")
        view, already, ms = await self._ready().load_adapter(request.id, reload=request.reload,
                                                                  pin=request.pin)
        return pb.LoadAdapterResponse(adapter=convert.adapter_to_pb(view), already_loaded=already, load_ms=ms)

    @unary
    async def UnloadAdapter(self, request, context):
        check_admin(self.config, context, "UnloadAdapter")
        return pb.UnloadAdapterResponse(freed_bytes=await self._ready().unload_adapter(request.id))

    @unary
    async def ListAdapters(self, request, context):
        backend = self._ready()
        views = backend.list_adapters(request.include_store)
        return pb.ListAdaptersResponse(adapters=[convert.adapter_to_pb(v) for v in views],
                                       max_slots=backend.config.max_slots)

    @unary
    async def GetAdapter(self, request, context):
        return pb.GetAdapterResponse(adapter=convert.adapter_to_pb(await self._ready().get_adapter(request.id)))

    @client_streaming
    async def UploadAdapter(self, first, rest, context):
        check_admin(self.config, context, "UploadAdapter")
        view, replaced = await self._ready().upload_adapter(convert.upload_header_from_pb(first),
                                                            convert.upload_chunks_from_pb(rest))
        return pb.UploadAdapterResponse(adapter=convert.adapter_to_pb(view), replaced=replaced)
