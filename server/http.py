"""The OpenAI-compatible HTTP API: a FastAPI app over the same Gate, Backend, limits, metrics and admin policy as the
adalora.v1 gRPC servicer, served by uvicorn on the gRPC server's event loop (`HttpFrontend`).

  POST /v1/completions, /v1/chat/completions   text generation (stream: server-sent events ending `data: [DONE]`)
  POST /v1/embeddings, /classify               an encoder base (mean-pooled, L2-normalized embeddings; vLLM's /classify)
  GET  /v1/models, /v1/models/{id}             the base under its served name, and every adapter in the store
  POST /v1/load_lora_adapter, /v1/unload_lora_adapter   vLLM's admin shape; the gRPC admin RPCs' credentials
  GET  /health (200 / 503), /metrics (Prometheus, names as vLLM's), /openapi.json, /docs

Errors are OpenAI's JSON {"error": {"message", "type", "param", "code"}} with the HTTP status of server.errors.STATUS;
429 and 503 carry Retry-After. Request bodies over --max-message-bytes are refused (413) before they are parsed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import math
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adalora.engine.engine import Selection
from adalora.engine.errors import DeadlineExpired, InvalidRequest, NonFiniteOutput
from adalora.server import openai_api as oa
from adalora.server.auth import bearer_token, check_admin
from adalora.server.backend import Backend
from adalora.server.config import ServerConfig
from adalora.server.domain import Completion, EncodeCall, GenerateCall, TokenDelta, model_selection
from adalora.server.errors import RETRYABLE_HTTP, RequestTooLarge, Unauthenticated, http_status_of, redactor, status_of
from adalora.server.gate import Gate
from adalora.server.metrics import Metrics, exposition
from adalora.server.store import check_id

log = logging.getLogger("adalora.server")
RETRY_AFTER_S = 1


class HeaderContext:
    """An HTTP request as auth.check_admin reads a gRPC call: its Authorization header; no client certificate names
    (mTLS admin names apply to the gRPC port)."""

    def __init__(self, request: Request) -> None:
        self.request = request

    def invocation_metadata(self) -> list[tuple[str, str]]:
        value = self.request.headers.get("authorization")
        return [] if value is None else [("authorization", value)]

    def auth_context(self) -> dict:
        return {}


class BodyLimit:
    """Reads a request body whole, up to max_bytes, before the app sees it; a larger one is answered 413 unread."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        body, more = b"", True
        too_large = declared.isdigit() and int(declared) > self.max_bytes
        while more and not too_large:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            too_large = len(body) > self.max_bytes
        if too_large:
            error = RequestTooLarge(f"the request body is over this server's limit of {self.max_bytes} bytes "
                                    f"(--max-message-bytes); send less per request")
            return await error_response(error, str(error))(scope, receive, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def error_response(error: BaseException, message: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    status = http_status_of(error)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in RETRYABLE_HTTP else None
    return JSONResponse(oa.error_body(message, status, param, code), status_code=status, headers=headers)


def validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    """(message, param) of a body pydantic refused: each bad field by its path."""
    parts, first = [], None
    for e in error.errors()[:5]:
        if e.get("type") == "json_invalid":  # loc is ("body", character offset)
            reason = (e.get("ctx") or {}).get("error", "invalid JSON")
            return f"the request body is not valid JSON ({reason} at character {e['loc'][-1]})", None
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        first = first or (loc[0] if loc else None)
        parts.append(f"{'.'.join(loc) or 'the body'}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request body is not valid JSON of this route's shape", first


class HttpApi:
    """The routes, over `gate` (the Backend once attached, until draining)."""

    def __init__(self, config: ServerConfig, gate: Gate, metrics: Metrics) -> None:
        self.config, self.gate, self.metrics = config, gate, metrics
        self.redact = redactor(config)
        self.created = int(time.time())
        self.app = self._build()

    # ---- plumbing -------------------------------------------------------------------------------------------

    def _fail(self, error: BaseException) -> JSONResponse:
        if status_of(error).name == "INTERNAL":
            log.exception("internal error", exc_info=error)
            message = f"internal server error ({type(error).__name__}); the server log has the details"
            return JSONResponse(oa.error_body(message, 500), status_code=500)
        return error_response(error, self.redact(str(error)), code=oa.error_code(error))

    async def _answer(self, route: str, adapter: Selection, work: Callable[[], Awaitable[Response]]) -> Response:
        """Run one request: an error becomes its OpenAI-shaped answer; status and latency are recorded either way
        (a stream's when it ends)."""
        started = time.perf_counter()
        try:
            try:
                async with asyncio.timeout(self.config.http_timeout_s):
                    response = await work()
            except TimeoutError:
                raise DeadlineExpired(f"the request ran past this server's {self.config.http_timeout_s:g} s deadline "
                                      f"(--http-timeout); ask for less") from None
        except Exception as error:  # noqa: BLE001 - every error becomes a status
            self.metrics.rpc_done(route, adapter, status_of(error).name, time.perf_counter() - started)
            return self._fail(error)
        if not isinstance(response, StreamingResponse):
            self.metrics.rpc_done(route, adapter, "OK", time.perf_counter() - started)
        return response

    def _api_key(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        token = bearer_token(HeaderContext(request).invocation_metadata())
        if token is None or not hmac.compare_digest(token.encode(), self.config.api_key.encode()):
            raise Unauthenticated("this server needs an API key: send 'Authorization: Bearer <key>' (the server's "
                                  "--api-key / ADALORA_API_KEY)")

    def _admin(self, request: Request, route: str) -> None:
        """The admin credentials (token) as for the gRPC admin RPCs; without them configured, the API key too."""
        if self.config.admin_token is None:
            self._api_key(request)
        check_admin(self.config, HeaderContext(request), route)

    def _deadline(self) -> float:
        return time.monotonic() + self.config.http_timeout_s

    # ---- generation -----------------------------------------------------------------------------------------

    async def _complete_all(self, backend: Backend, calls: Sequence[GenerateCall]) -> list[Completion]:
        return list(await gather_or_cancel([backend.complete(c) for c in calls]))  # under _answer's deadline

    async def _stream(self, route: str, adapter: Selection, backend: Backend, calls: Sequence[GenerateCall],
                      shape: oa.StreamShape, stops: Sequence[str], n: int, include_usage: bool) -> StreamingResponse:
        """Every choice is queued and refusals are answered with their status before the first byte is sent; then
        chunks as tokens come. A client that goes away cancels every choice (rows freed at the next step)."""
        streams = [backend.generate(call) for call in calls]
        deadline = calls[0].deadline  # time.monotonic(), which is the event loop's clock
        try:
            firsts = await gather_or_cancel([anext(s) for s in streams])
        except BaseException:
            await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
            raise
        started = time.perf_counter()

        async def events() -> AsyncIterator[str]:
            queue: asyncio.Queue[tuple[int, TokenDelta | Completion | BaseException]] = asyncio.Queue()

            async def pump(i: int) -> None:
                try:
                    await queue.put((i, firsts[i]))
                    async for event in streams[i]:
                        await queue.put((i, event))
                except Exception as error:  # noqa: BLE001 - reported in the stream
                    await queue.put((i, error))
                finally:
                    await streams[i].aclose()

            tasks = [asyncio.ensure_future(pump(i)) for i in range(len(streams))]
            holds = [oa.StopHold(stops) for _ in streams]
            done: dict[int, Completion] = {}
            status = "OK"
            try:
                for i in range(len(streams)):
                    start = shape.start(i)
                    if start is not None:
                        yield sse(start)
                while len(done) < len(streams):
                    async with asyncio.timeout_at(deadline):  # the request's, from its arrival; never around a send
                        i, event = await queue.get()
                        if isinstance(event, BaseException):
                            status = status_of(event).name
                            yield sse(oa.error_body(self.redact(str(event)), http_status_of(event)))
                            return
                        if isinstance(event, TokenDelta):
                            text = holds[i].add(event.text)
                            if text:
                                yield sse(shape.text(i, text))
                        else:
                            done[i] = event
                            yield sse(shape.text(i, holds[i].finish(event), oa.FINISH[event.finish_reason]))
                if include_usage:
                    yield sse(shape.usage(oa.completions_usage([done[i] for i in range(len(streams))], n)))
                yield "data: [DONE]\n\n"
            except TimeoutError:
                status = "DEADLINE_EXCEEDED"
                yield sse(oa.error_body(f"the request ran past this server's {self.config.http_timeout_s:g} s "
                                        f"deadline (--http-timeout)", 504))
            except (asyncio.CancelledError, GeneratorExit):
                status = "CANCELLED"
                raise
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self.metrics.rpc_done(route, adapter, status, time.perf_counter() - started)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _generate(self, route: str, body: oa.SamplingBody, prompts: Sequence[str | tuple[int, ...]],
                        max_tokens: int | None, chat: bool) -> Response:
        """The body was checked for unsupported parameters by its route."""
        backend = self.gate.ready()
        calls = oa.generate_calls(body, prompts, max_tokens, self.config, self._deadline())
        stops = calls[0].params.stop_strings()
        if body.stream:
            return await self._stream(route, calls[0].adapter, backend, calls, oa.StreamShape(chat, body.model),
                                      stops, body.n, body.include_usage())
        completions = await self._complete_all(backend, calls)
        make = oa.chat_response if chat else oa.completion_response
        return JSONResponse(make(body.model, completions, body.n, stops))

    async def completions(self, body: oa.CompletionBody, request: Request) -> Response:
        async def work() -> Response:
            self._api_key(request)
            body.refuse_unsupported()
            prompts = oa.texts_or_ids(body.prompt, "prompt")
            return await self._generate("/v1/completions", body, prompts, body.max_tokens, False)
        return await self._answer("/v1/completions", named(body, self.config), work)

    async def chat(self, body: oa.ChatBody, request: Request) -> Response:
        async def work() -> Response:
            self._api_key(request)
            body.refuse_unsupported()
            prompt = await self.gate.ready().chat_prompt([m.rendered() for m in body.messages])
            return await self._generate("/v1/chat/completions", body, [prompt], body.max_new(), True)
        return await self._answer("/v1/chat/completions", named(body, self.config), work)

    # ---- encoder --------------------------------------------------------------------------------------------

    async def embeddings(self, body: oa.EmbeddingBody, request: Request) -> Response:
        async def work() -> Response:
            self._api_key(request)
            body.refuse_unsupported()
            backend = self.gate.ready()
            call = EncodeCall(oa.texts_or_ids(body.input, "input"), model_selection(body.model, self.config), normalize=True)
            vectors = (await backend.embed(call)).numpy()
            if not np.isfinite(vectors).all():
                raise NonFiniteOutput("the embeddings came out NaN or infinite: the adapter overflows this model in "
                                      "its dtype; check the adapter or serve in float32")
            rows = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors] \
                if body.encoding_format == "base64" else vectors.tolist()
            tokens = await backend.count_tokens(call.inputs)
            return JSONResponse(oa.embeddings_response(body.model, rows, tokens))
        return await self._answer("/v1/embeddings", named(body, self.config), work)

    async def classify(self, body: oa.EncodeBody, request: Request) -> Response:
        async def work() -> Response:
            self._api_key(request)
            body.refuse_unsupported()
            backend = self.gate.ready()
            call = EncodeCall(oa.texts_or_ids(body.input, "input"), model_selection(body.model, self.config))
            results = await backend.classify(call)
            if not all(math.isfinite(v) for r in results for v in r.scores.values()):
                raise NonFiniteOutput("the class probabilities came out NaN: the adapter overflows this model in its "
                                      "dtype; check the adapter or serve in float32")
            tokens = await backend.count_tokens(call.inputs)
            return JSONResponse(oa.classify_response(body.model, results, tokens))
        return await self._answer("/classify", named(body, self.config), work)

    # ---- models and admin -----------------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        async def work() -> Response:
            self._api_key(request)
            backend = self.gate.ready()
            views = await backend.list_with_store()
            data = [oa.base_entry(self.config, self.created, backend.max_positions)]
            data += [oa.adapter_entry(v, self.config, self.created) for v in views]
            return JSONResponse({"object": "list", "data": data})
        return await self._answer("/v1/models", None, work)

    async def model(self, model_id: str, request: Request) -> Response:
        async def work() -> Response:
            self._api_key(request)
            backend = self.gate.ready()
            if model_selection(model_id, self.config) is None:
                return JSONResponse(oa.base_entry(self.config, self.created, backend.max_positions))
            view = await backend.get_adapter(model_id)
            return JSONResponse(oa.adapter_entry(view, self.config, self.created))
        return await self._answer("/v1/models/{id}", None if model_id == self.config.model_name else model_id, work)

    def _store_id(self, name: str, path: str | None) -> str:
        """lora_name as a store id; lora_path, when given, must be that id or a path naming its folder inside the
        store (a client never reaches a folder outside it)."""
        adapter_id = check_id(name)
        if path is None or path == adapter_id:
            return adapter_id
        if "\x00" in path or not path.isprintable():
            raise InvalidRequest("lora_path holds a NUL or another unprintable character; give the adapter's id")
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest("lora_path is not valid Unicode; give the adapter's id") from None
        store = Path(self.config.adapter_dir).resolve()
        target = Path(path) if Path(path).is_absolute() else store / path
        target = target.resolve()
        if target.parent != store:
            raise InvalidRequest(f"lora_path {self.redact(path)!r} is not a folder of this server's adapter store; "
                                 f"give the adapter's id (its folder name in the store)")
        if target.name != adapter_id:
            raise InvalidRequest(f"lora_path names store adapter {target.name!r} but lora_name is {adapter_id!r}; an "
                                 f"adapter is served under its folder's name")
        return adapter_id

    async def load_lora(self, body: oa.LoadLoraBody, request: Request) -> Response:
        async def work() -> Response:
            self._admin(request, "/v1/load_lora_adapter")
            body.refuse_unsupported()
            adapter_id = self._store_id(body.lora_name, body.lora_path)
            _, already, _ = await self.gate.ready().load_adapter(adapter_id, reload=body.load_inplace)
            verb = "was already loaded" if already else "added successfully"
            return PlainTextResponse(f"Success: LoRA adapter '{adapter_id}' {verb}.")
        return await self._answer("/v1/load_lora_adapter", body.lora_name, work)

    async def unload_lora(self, body: oa.UnloadLoraBody, request: Request) -> Response:
        async def work() -> Response:
            self._admin(request, "/v1/unload_lora_adapter")
            body.refuse_unsupported()
            adapter_id = check_id(body.lora_name)
            await self.gate.ready().unload_adapter(adapter_id)
            return PlainTextResponse(f"Success: LoRA adapter '{adapter_id}' removed successfully.")
        return await self._answer("/v1/unload_lora_adapter", body.lora_name, work)

    async def health(self) -> Response:
        ok = self.gate.serving
        return PlainTextResponse("SERVING\n" if ok else "NOT_SERVING\n", status_code=200 if ok else 503)

    async def prometheus(self, request: Request) -> Response:
        body, content_type = exposition(self.metrics.registry, request.headers.get("accept"))
        return Response(body, media_type=None, headers={"Content-Type": content_type})

    # ---- the app --------------------------------------------------------------------------------------------

    def _build(self) -> FastAPI:
        app = FastAPI(title="adalora", summary="AdaLoRA adapters behind the OpenAI API", version="1")
        post, get = app.post, app.get
        post("/v1/completions")(self.completions)
        post("/v1/chat/completions")(self.chat)
        post("/v1/embeddings")(self.embeddings)
        post("/classify")(self.classify)
        post("/v1/classify")(self.classify)
        get("/v1/models")(self.models)
        get("/v1/models/{model_id}")(self.model)
        post("/v1/load_lora_adapter")(self.load_lora)
        post("/v1/unload_lora_adapter")(self.unload_lora)
        get("/health")(self.health)
        get("/metrics")(self.prometheus)

        @app.exception_handler(RequestValidationError)
        async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
            message, param = validation_message(error)
            return JSONResponse(oa.error_body(message, 400, param), status_code=400)

        @app.exception_handler(HTTPException)
        async def http_error(request: Request, error: HTTPException) -> JSONResponse:
            message = "no such route; see /openapi.json" if error.status_code == 404 else str(error.detail)
            return JSONResponse(oa.error_body(message, error.status_code), status_code=error.status_code,
                                headers=error.headers)

        app.add_middleware(BodyLimit, max_bytes=self.config.max_message_bytes)
        app.openapi = lambda: openapi_with_400(app)
        return app


def openapi_with_400(app: FastAPI) -> dict:
    """FastAPI's schema, saying 400 where it says 422 (a body that fails validation is answered 400, as OpenAI does)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        for operation in (op for path in schema.get("paths", {}).values() for op in path.values()):
            responses = operation.get("responses", {})
            if "422" in responses:
                responses["400"] = {**responses.pop("422"), "description": "Bad request parameters"}
        app.openapi_schema = schema
    return app.openapi_schema


def named(body: oa.SamplingBody | oa.EncodeBody, config: ServerConfig) -> Selection:
    """The adapter a body names, unchecked (the metrics label; convert.named_adapter's HTTP twin): None for the base."""
    adapters = getattr(body, "adapters", None)
    if adapters:
        return dict(adapters)
    return None if body.model == config.model_name else body.model


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def gather_or_cancel(awaitables: Sequence[Awaitable]) -> list:
    """All results in order; on the first error the others are cancelled and the error raised."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class _Uvicorn(uvicorn.Server):
    """uvicorn that leaves signals to `adalora serve` (which drains both front-ends itself)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def bind(host: str, port: int) -> socket.socket:
    family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot serve HTTP on {host}:{port} ({e}); pick another --http-port") from e
    sock.set_inheritable(True)
    return sock


class HttpFrontend:
    """uvicorn serving `api` on config.host:config.http_port (bound at construction; 0 = any free port) on the running
    event loop; TLS with the gRPC port's certificate when config.tls_cert is set."""

    def __init__(self, api: HttpApi, config: ServerConfig) -> None:
        self.sock = bind(config.host, config.http_port)
        self.port: int = self.sock.getsockname()[1]
        tls_args = {}
        if config.tls_cert is not None:
            tls_args = {"ssl_certfile": config.tls_cert, "ssl_keyfile": config.tls_key}
            if config.tls_client_ca is not None:
                tls_args |= {"ssl_ca_certs": config.tls_client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        uconfig = uvicorn.Config(api.app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                                 timeout_graceful_shutdown=max(config.grace_s, 0.1), **tls_args)
        self.server = _Uvicorn(uconfig)
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.task = asyncio.ensure_future(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises what stopped it
                raise OSError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self, grace: float | None) -> None:
        """Stop accepting; requests in flight get `grace` seconds (None: config.grace_s), then are cancelled."""
        if self.task is None:
            self.sock.close()
            return
        if grace is not None:
            self.server.config.timeout_graceful_shutdown = max(grace, 0.1)
        self.server.should_exit = True
        await self.task
