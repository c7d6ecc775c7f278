"""inference.GRPCInferenceService, the Open Inference Protocol v2 (KServe, Triton, Seldon MLServer clients) on the
gRPC port, over the same Gate, Backend, limits, metrics and admin policy as adalora.v1: each RPC is
kserve_convert.from tensors -> Backend -> kserve_convert.to tensors, and errors leave through servicer.answered with
adalora.v1's status codes and messages.

A model is an adapter id, or the base under its served name (--served-model-name). A causal-LM model generates
(`text_input` -> `text_output`); on an encoder base, an adapter with a classification head classifies (`label`,
`score`, `scores`) and the base or a feature adapter embeds (`embedding`, mean-pooled)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from importlib import metadata

import grpc
import numpy as np

from adalora.engine.engine import Selection
from adalora.engine.errors import AdapterNotFound, InvalidRequest
from adalora.server import kserve_convert as kc
from adalora.server.auth import check_admin
from adalora.server.backend import Backend
from adalora.server.config import ServerConfig
from adalora.server.domain import Completion, EncodeCall, TokenDelta, model_selection, unsent
from adalora.server.errors import redactor, status_of
from adalora.server.gate import Gate
from adalora.server.gen.inference import grpc_service_pb2 as kpb
from adalora.server.gen.inference import grpc_service_pb2_grpc as kgrpc
from adalora.server.metrics import Metrics
from adalora.server.servicer import answered, fits
from adalora.server.store import check_id

SERVICE = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
EXTENSIONS = ("model_repository",)
FINAL = "triton_final_response"
"""Response parameter of Triton's decoupled streams: true on a request's last response."""


def server_version() -> str:
    try:
        return metadata.version("adalora")
    except metadata.PackageNotFoundError:
        return "0"


def named_model(request, config: ServerConfig) -> Selection:
    """The metrics label of a v2 request: the adapter it names, None for the base (its served name) or none."""
    name = getattr(request, "model_name", None) or getattr(request, "name", None)
    return None if not name or name == config.model_name else name


class InferenceServicer(kgrpc.GRPCInferenceServiceServicer):
    def __init__(self, config: ServerConfig, metrics: Metrics, gate: Gate) -> None:
        self.config, self.metrics, self.gate = config, metrics, gate
        self.redact = redactor(config)
        self.named = lambda request: named_model(request, config)

    def fits(self, message):
        return fits(message, self.config.max_message_bytes)

    def _deadline(self, context) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    # ---- health and metadata ------------------------------------------------------------------------------------

    async def ServerLive(self, request, context):
        async with answered(self, "ServerLive", request, context):
            return kpb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        async with answered(self, "ServerReady", request, context):
            return kpb.ServerReadyResponse(ready=self.gate.serving)

    async def ServerMetadata(self, request, context):
        async with answered(self, "ServerMetadata", request, context):
            return kpb.ServerMetadataResponse(name="adalora", version=server_version(), extensions=EXTENSIONS)

    async def ModelReady(self, request, context):
        async with answered(self, "ModelReady", request, context):
            if not self.gate.serving:
                return kpb.ModelReadyResponse(ready=False)
            try:
                selection = model_selection(request.name, self.config)
            except AdapterNotFound:
                return kpb.ModelReadyResponse(ready=False)
            ready = selection is None or self.gate.ready().residency.tier(selection) == "device"
            return kpb.ModelReadyResponse(ready=ready)

    async def _is_classifier(self, backend: Backend, selection: Selection) -> bool:
        if selection is None:
            return False
        view = await backend.get_adapter(selection)  # AdapterNotFound for an id the store lacks
        return view.stored.adapter.task_type == "seq-cls"

    async def ModelMetadata(self, request, context):
        async with answered(self, "ModelMetadata", request, context):
            backend = self.gate.ready()
            selection = model_selection(request.name, self.config)
            classifier = await self._is_classifier(backend, selection)  # NOT_FOUND for an id the store lacks
            if backend.kind == "causal-lm":
                inputs, outputs = kc.GENERATE_METADATA
            elif classifier:
                inputs = [kc.tensor("text_input", "BYTES", [-1])]
                outputs = [kc.tensor("label", "BYTES", [-1]), kc.tensor("score", "FP32", [-1]),
                           kc.tensor("scores", "FP32", [-1, -1])]
            else:
                inputs, outputs = [kc.tensor("text_input", "BYTES", [-1])], [kc.tensor("embedding", "FP32", [-1, -1])]
            return self.fits(kpb.ModelMetadataResponse(name=request.name, versions=["1"], platform="adalora",
                                                       inputs=inputs, outputs=outputs))

    # ---- inference ----------------------------------------------------------------------------------------------

    async def _generate(self, backend: Backend, generation: kc.Generation) -> AsyncIterator[str | Completion]:
        """The text chunks of a generation (the prefix first, when asked for), then its Completion. The prefix waits
        for the first event: a refused request (which raises before it) sends nothing."""
        async with contextlib.aclosing(backend.generate(generation.call)) as events:
            streamed, prefix = "", generation.prefix
            async for event in events:
                if prefix:
                    yield prefix
                    prefix = ""
                if isinstance(event, TokenDelta):
                    streamed += event.text
                    if event.text:
                        yield event.text
                else:
                    rest = unsent(event.text, streamed)
                    if rest:
                        yield rest
                    yield event

    async def _infer(self, request, context) -> kpb.ModelInferResponse:
        backend = self.gate.ready()
        if backend.kind == "causal-lm":
            generation = kc.generation_of(request, self.config, self._deadline(context))
            if generation.stream:
                raise InvalidRequest("stream=true needs ModelStreamInfer (tritonclient: start_stream / "
                                     "async_stream_infer); ModelInfer answers once")
            text = generation.prefix + (await backend.complete(generation.call)).text
            return kc.response(request, [kc.bytes_output("text_output", [text])])
        selection = model_selection(request.model_name, self.config)
        call = EncodeCall(kc.texts_of(request), selection)
        if await self._is_classifier(backend, selection):
            return kc.response(request, kc.classification_outputs(await backend.classify(call)))
        return kc.response(request, [kc.fp32_output("embedding", np.asarray(await backend.embed(call)))])

    async def ModelInfer(self, request, context):
        async with answered(self, "ModelInfer", request, context):
            return self.fits(await self._infer(request, context))

    async def _stream_one(self, request, context, out: asyncio.Queue) -> None:
        """Answer one request of a stream into `out`: its chunks (stream=true) or its one answer; an error as
        error_message."""
        started = time.perf_counter()
        try:
            backend = self.gate.ready()
            if backend.kind != "causal-lm":
                answer = await self._infer(request, context)
                answer.parameters[FINAL].bool_param = True
                await out.put(kpb.ModelStreamInferResponse(infer_response=self.fits(answer)))
                self.metrics.rpc_done("ModelStreamInfer", self.named(request), "OK", time.perf_counter() - started)
                return
            generation = kc.generation_of(request, self.config, self._deadline(context))
            if not generation.stream:
                answer = await self._infer(request, context)
                answer.parameters[FINAL].bool_param = True
                await out.put(kpb.ModelStreamInferResponse(infer_response=self.fits(answer)))
            else:
                async for chunk in self._generate(backend, generation):
                    final = isinstance(chunk, Completion)
                    text = [""] if final else [chunk]
                    answer = kc.response(request, [kc.bytes_output("text_output", text)], {FINAL: final})
                    await out.put(kpb.ModelStreamInferResponse(infer_response=self.fits(answer)))
            self.metrics.rpc_done("ModelStreamInfer", self.named(request), "OK", time.perf_counter() - started)
        except Exception as error:  # noqa: BLE001 - a stream answers errors in error_message
            code = status_of(error)
            self.metrics.rpc_done("ModelStreamInfer", self.named(request), code.name, time.perf_counter() - started)
            message = self.redact(str(error)) if code != grpc.StatusCode.INTERNAL else \
                f"internal server error ({type(error).__name__}); the server log has the details"
            failed = kpb.ModelInferResponse(model_name=request.model_name, id=request.id)
            failed.parameters[FINAL].bool_param = True  # a decoupled client counts this request as ended
            await out.put(kpb.ModelStreamInferResponse(error_message=f"{code.name}: {message}", infer_response=failed))

    async def ModelStreamInfer(self, request_iterator, context):
        """Every request of the stream runs at once (they batch together); answers come as they are ready."""
        out: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        done = object()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.ensure_future(self._stream_one(request, context, out))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
            finally:
                await out.put(done)  # even when reading the stream failed: the answer loop must end

        reader = asyncio.ensure_future(read())
        try:
            while (message := await out.get()) is not done:
                yield message
            await reader
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(reader, *tasks, return_exceptions=True)

    # ---- the repository extension -------------------------------------------------------------------------------

    async def RepositoryIndex(self, request, context):
        async with answered(self, "RepositoryIndex", request, context):
            backend = self.gate.ready()
            models = [kpb.RepositoryIndexResponse.ModelIndex(name=self.config.model_name, version="1", state="READY")]
            for view in await backend.list_with_store():
                ready = view.residency == "device"
                models.append(kpb.RepositoryIndexResponse.ModelIndex(
                    name=view.id, version="1", state="READY" if ready else "UNAVAILABLE",
                    reason="" if ready else f"not loaded ({view.residency}); a request or RepositoryModelLoad loads it"))
            if request.ready:
                models = [m for m in models if m.state == "READY"]
            return self.fits(kpb.RepositoryIndexResponse(models=models))

    def _adapter_id(self, name: str) -> str:
        if name == self.config.model_name:
            raise InvalidRequest(f"{name!r} is the base model, which is always loaded; load and unload adapters")
        return check_id(name)

    async def RepositoryModelLoad(self, request, context):
        async with answered(self, "RepositoryModelLoad", request, context):
            check_admin(self.config, context, "RepositoryModelLoad")
            if request.parameters:
                raise InvalidRequest(f"RepositoryModelLoad takes no parameters (got {sorted(request.parameters)}); "
                                     f"an adapter is loaded from its store folder as it is")
            await self.gate.ready().load_adapter(self._adapter_id(request.model_name), reload=True)
            return kpb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        async with answered(self, "RepositoryModelUnload", request, context):
            check_admin(self.config, context, "RepositoryModelUnload")
            unknown = sorted(set(request.parameters) - {"unload_dependents"})
            if unknown:
                raise InvalidRequest(f"RepositoryModelUnload takes no parameter {unknown}")
            await self.gate.ready().unload_adapter(self._adapter_id(request.model_name))
            return kpb.RepositoryModelUnloadResponse()

