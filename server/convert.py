"""Protobuf <-> domain translation, the only module that reads or builds adalora.v1 messages for the servicer.

from_pb side: every request field is checked here (or by the domain object it becomes) and a bad one raises
InvalidRequest with what to change; the server's limits come from ServerConfig.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import torch

from adalora.engine import Classification, SamplingParams
from adalora.engine.engine import Selection
from adalora.engine.errors import InvalidRequest
from adalora.server.domain import AdapterView, Completion, EncodeCall, GenerateCall, Timings, TokenDelta, unsent
from adalora.server.config import ServerConfig
from adalora.server.gen.adalora.v1 import adalora_pb2 as pb
from adalora.server.store import check_id
from adalora.server.upload import UploadFile, UploadHeader

FINISH_REASONS = {"length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP, "eos": pb.FINISH_REASON_EOS}
RESIDENCY = {"device": pb.RESIDENCY_DEVICE, "host": pb.RESIDENCY_HOST, "disk": pb.RESIDENCY_DISK}


# ---- from_pb ------------------------------------------------------------------------------------------------

def adapter_from_pb(selection: pb.AdapterSelection) -> Selection:
    """An id, a {id: weight} mixture, or None (the base model)."""
    which = selection.WhichOneof("selection")
    if which is None:
        return None
    if which == "id":
        return check_id(selection.id)
    mix: dict[str, float] = {}
    for entry in selection.mix.adapters:
        if check_id(entry.id) in mix:
            raise InvalidRequest(f"adapter {entry.id!r} appears twice in the mix; give each id once with its total weight")
        mix[entry.id] = entry.weight
    if not mix:
        raise InvalidRequest("adapter.mix is empty; list at least one {id, weight}, or leave adapter unset for the base")
    return mix


def named_adapter(request) -> Selection:
    """The adapter a request names, unchecked (the metrics label comes from it, refused requests included): an
    AdapterSelection's id or {id: weight} mix, an admin request's id, or None when it names none."""
    if isinstance(request, (pb.LoadAdapterRequest, pb.UnloadAdapterRequest, pb.GetAdapterRequest)):
        return request.id
    if isinstance(request, pb.UploadAdapterRequest):  # an upload's first message
        return request.header.id if request.HasField("header") else None
    if not isinstance(request, (pb.GenerateRequest, pb.ClassifyRequest, pb.EmbedRequest)):
        return None
    which = request.adapter.WhichOneof("selection")
    if which == "id":
        return request.adapter.id
    return None if which is None else {entry.id: entry.weight for entry in request.adapter.mix.adapters}


def stop_from_pb(stop: pb.StopSequence, index: int) -> str | tuple[int, ...]:
    which = stop.WhichOneof("sequence")
    if which is None:
        raise InvalidRequest(f"params.stop[{index}] sets neither text nor token_ids; set one")
    return stop.text if which == "text" else tuple(stop.token_ids.ids)


def params_from_pb(params: pb.SamplingParams, config: ServerConfig) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=config.max_new(params.max_new_tokens),
        temperature=params.temperature if params.HasField("temperature") else 1.0,
        top_k=params.top_k,
        top_p=params.top_p if params.HasField("top_p") else 1.0,
        repetition_penalty=params.repetition_penalty if params.HasField("repetition_penalty") else 1.0,
        stop=tuple(stop_from_pb(s, i) for i, s in enumerate(params.stop)),
        seed=params.seed if params.HasField("seed") else None,
    )


def generate_from_pb(request: pb.GenerateRequest, config: ServerConfig) -> GenerateCall:
    which = request.WhichOneof("prompt")
    if which is None:
        raise InvalidRequest("the request has no prompt; set prompt text or token_ids")
    prompt = request.text if which == "text" else tuple(request.token_ids.ids)
    if not prompt:
        raise InvalidRequest(f"the prompt {which} is empty; give at least one character or token")
    return GenerateCall(prompt, adapter_from_pb(request.adapter), params_from_pb(request.params, config))


def encode_from_pb(request: pb.ClassifyRequest | pb.EmbedRequest, normalize: bool = False) -> EncodeCall:
    if not request.inputs:
        raise InvalidRequest("the request has no inputs; give at least one text or token_ids")
    kinds = {x.WhichOneof("input") for x in request.inputs}
    if None in kinds:
        raise InvalidRequest("an input sets neither text nor token_ids; set one in every input")
    if len(kinds) > 1:
        raise InvalidRequest("inputs mix texts and token_ids; send all of one kind per request")
    inputs = tuple(x.text if x.HasField("text") else tuple(x.token_ids.ids) for x in request.inputs)
    empty = [i for i, x in enumerate(inputs) if not x]
    if empty:
        raise InvalidRequest(f"inputs {empty[:5]} are empty; give at least one character or token in each")
    return EncodeCall(inputs, adapter_from_pb(request.adapter), normalize)


def upload_header_from_pb(first: pb.UploadAdapterRequest | None) -> UploadHeader:
    """The header of an UploadAdapter stream from its first message (None: the stream was empty)."""
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidRequest("an upload starts with a header message (id, overwrite, files); send it first")
    h = first.header
    return UploadHeader(h.id, h.overwrite, tuple(UploadFile(f.name, f.size, f.sha256) for f in h.files))


async def upload_chunks_from_pb(rest: AsyncIterator[pb.UploadAdapterRequest]) -> AsyncIterator[tuple[str, bytes]]:
    """(file name, bytes) of each message after the header."""
    async for message in rest:
        if message.WhichOneof("part") != "chunk":
            raise InvalidRequest("an upload has one header, in its first message; send only chunks after it")
        yield message.chunk.name, message.chunk.data


# ---- to_pb --------------------------------------------------------------------------------------------------

def timings_to_pb(t: Timings) -> pb.Timings:
    return pb.Timings(queue_ms=t.queue_ms, first_token_ms=t.first_token_ms, total_ms=t.total_ms)


def completion_to_pb(c: Completion) -> pb.GenerateResponse:
    return pb.GenerateResponse(text=c.text, token_ids=c.token_ids, finish_reason=FINISH_REASONS[c.finish_reason],
                               usage=pb.Usage(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens),
                               timings=timings_to_pb(c.timings))


def stream_to_pb(event: TokenDelta | Completion, streamed_text: str) -> pb.GenerateStreamResponse:
    """A token message, or the last message (whatever text the token messages did not carry yet)."""
    if isinstance(event, TokenDelta):
        return pb.GenerateStreamResponse(token_ids=[event.token_id], text=event.text)
    rest = unsent(event.text, streamed_text)
    return pb.GenerateStreamResponse(
        text=rest, finish_reason=FINISH_REASONS[event.finish_reason],
        usage=pb.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens),
        timings=timings_to_pb(event.timings))


def classification_to_pb(c: Classification) -> pb.Classification:
    return pb.Classification(label=c.label, scores=[pb.LabelScore(label=k, score=v) for k, v in c.scores.items()],
                             logits=c.logits.tolist())


def embeddings_to_pb(embeddings: torch.Tensor) -> pb.EmbedResponse:
    """(N, hidden) float32 -> one Embedding per row."""
    return pb.EmbedResponse(embeddings=[pb.Embedding(values=row) for row in embeddings.tolist()])


def adapter_to_pb(view: AdapterView) -> pb.AdapterInfo:
    info = pb.AdapterInfo(id=view.id, residency=RESIDENCY[view.residency], format=view.format,
                          device_bytes=view.device_bytes, pinned=view.pinned, in_flight=view.in_flight)
    if view.stored is not None:
        a = view.stored.adapter
        scales = a.module_scales()
        info.MergeFrom(pb.AdapterInfo(
            task_type=a.task_type, mode=a.mode, init_r=a.init_r, lora_alpha=a.lora_alpha,
            ranks=[pb.LayerRank(module=m, rank=r, scale=scales[m]) for m, r in a.ranks().items()],
            num_params=a.num_params(),
            head_params=a.head_params(), sha256=view.stored.sha256, version=view.stored.version,
            labels=a.labels or [], base_name=str(a.base.get("name", ""))))
    return info
