"""Open Inference Protocol v2 tensors <-> domain calls and answers: the only module that reads or builds
inference.* messages for server.kserve.

A request's inputs become {name: flat list of values}, from typed contents or raw_input_contents alike, each checked
against its datatype and shape. Generation follows Triton's LLM backends: `text_input` (one BYTES element), optional
scalar inputs `max_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `repetition_penalty`, `stream`,
`exclude_input_in_output`, `stop` (BYTES, any count) and `sampling_parameters` (one BYTES element: a JSON object of
the same names, plus `lora_name` when the model is the base); explicit inputs win over the JSON. Encoder models take
`text_input` with one element per text.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from adalora.engine import Classification, SamplingParams
from adalora.engine.engine import Selection
from adalora.engine.errors import InvalidRequest
from adalora.server.config import ServerConfig
from adalora.server.domain import GenerateCall, model_selection
from adalora.server.gen.inference import grpc_service_pb2 as kpb
from adalora.server.store import check_id

NUMERIC = {"BOOL": ("bool_contents", "<?"), "INT8": ("int_contents", "<i1"), "INT16": ("int_contents", "<i2"),
           "INT32": ("int_contents", "<i4"), "INT64": ("int64_contents", "<i8"), "UINT8": ("uint_contents", "<u1"),
           "UINT16": ("uint_contents", "<u2"), "UINT32": ("uint_contents", "<u4"),
           "UINT64": ("uint64_contents", "<u8"), "FP32": ("fp32_contents", "<f4"), "FP64": ("fp64_contents", "<f8")}
"""Datatype -> (InferTensorContents field, little-endian numpy dtype of its raw form). BYTES is handled apart."""
INTEGERS = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}
SCALARS = {"max_tokens": "int", "temperature": "number", "top_p": "number", "top_k": "int", "seed": "int",
           "repetition_penalty": "number", "stream": "bool", "exclude_input_in_output": "bool"}
"""Optional one-element generation inputs (and sampling_parameters keys), by kind."""
GENERATE_INPUTS = {"text_input", "stop", "sampling_parameters", *SCALARS}
JSON_ONLY = {"lora_name"}
MAX_ELEMENTS = 1 << 20


# ---- tensors in ------------------------------------------------------------------------------------------------

def _bytes_elements(raw: bytes, name: str) -> list[bytes]:
    """A raw BYTES tensor: each element a 4-byte little-endian length, then that many bytes."""
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise InvalidRequest(f"input {name!r}: raw BYTES content ends inside an element's 4-byte length")
        (size,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + size > len(raw):
            raise InvalidRequest(f"input {name!r}: a raw BYTES element of {size} bytes runs past the content's end")
        out.append(raw[at:at + size])
        at += size
    return out


def _elements(tensor: kpb.ModelInferRequest.InferInputTensor) -> int:
    if any(d < 0 for d in tensor.shape):
        raise InvalidRequest(f"input {tensor.name!r} has a negative dimension in its shape {list(tensor.shape)}")
    count = math.prod(tensor.shape)
    if count > MAX_ELEMENTS:
        raise InvalidRequest(f"input {tensor.name!r} has {count} elements, over this server's limit of {MAX_ELEMENTS}")
    return count


def _values(tensor: kpb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> list:
    datatype = tensor.datatype
    if datatype != "BYTES" and datatype not in NUMERIC:
        raise InvalidRequest(f"input {tensor.name!r} has datatype {datatype!r}; use BYTES or one of {sorted(NUMERIC)}")
    if raw is not None:
        if datatype == "BYTES":
            values = _bytes_elements(raw, tensor.name)
        else:
            dtype = np.dtype(NUMERIC[datatype][1])
            if len(raw) % dtype.itemsize:
                raise InvalidRequest(f"input {tensor.name!r}: {len(raw)} raw bytes are not a whole number of "
                                     f"{datatype} elements")
            values = np.frombuffer(raw, dtype=dtype).tolist()
    else:
        field = "bytes_contents" if datatype == "BYTES" else NUMERIC[datatype][0]
        values = list(getattr(tensor.contents, field))
    if len(values) != _elements(tensor):
        raise InvalidRequest(f"input {tensor.name!r} has shape {list(tensor.shape)} but {len(values)} elements")
    return values


def inputs_of(request: kpb.ModelInferRequest) -> dict[str, tuple[str, list]]:
    """{name: (datatype, flat values)} of a request's inputs (BYTES values are bytes)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequest(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; give one "
                             f"per input, in order")
    out: dict[str, tuple[str, list]] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in out:
            raise InvalidRequest(f"input {tensor.name!r} is given twice")
        out[tensor.name] = (tensor.datatype, _values(tensor, raw[i] if raw else None))
    return out


def _text(value: bytes, name: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"input {name!r} is not UTF-8 text") from None


def _scalar(name: str, datatype: str, values: list):
    if len(values) != 1:
        raise InvalidRequest(f"input {name!r} must have one element, has {len(values)}")
    kind, value = SCALARS[name], values[0]
    allowed = {"bool": {"BOOL"}, "int": INTEGERS, "number": INTEGERS | {"FP32", "FP64"}}[kind]
    if datatype not in allowed:
        raise InvalidRequest(f"input {name!r} has datatype {datatype}; use {' or '.join(sorted(allowed))}")
    return value


def _from_json(raw: list) -> dict:
    if len(raw) != 1:
        raise InvalidRequest(f"input 'sampling_parameters' must have one element (a JSON object), has {len(raw)}")
    try:
        options = json.loads(_text(raw[0], "sampling_parameters"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, an int past Python's digit limit, deep nesting
        raise InvalidRequest(f"input 'sampling_parameters' is not JSON this server reads: {str(e)[:200]}") from None
    if not isinstance(options, dict):
        raise InvalidRequest("input 'sampling_parameters' must be a JSON object")
    unknown = sorted(set(options) - set(SCALARS) - {"stop"} - JSON_ONLY)
    if unknown:
        raise InvalidRequest(f"sampling_parameters has unknown key(s) {unknown}; known: "
                             f"{sorted({*SCALARS, 'stop', *JSON_ONLY})}")
    return options


@dataclass(frozen=True)
class Generation:
    call: GenerateCall
    stream: bool
    prefix: str
    """The prompt text when exclude_input_in_output is false (text_output then starts with it), else ''."""


def generation_of(request: kpb.ModelInferRequest, config: ServerConfig, deadline: float | None) -> Generation:
    inputs = inputs_of(request)
    unknown = sorted(set(inputs) - GENERATE_INPUTS)
    if unknown:
        raise InvalidRequest(f"unknown input(s) {unknown}; this model takes {sorted(GENERATE_INPUTS)}")
    if "text_input" not in inputs:
        raise InvalidRequest("the request has no 'text_input' input (BYTES, one element: the prompt)")
    datatype, texts = inputs["text_input"]
    if datatype != "BYTES" or len(texts) != 1:
        raise InvalidRequest(f"'text_input' must be BYTES with one element (one prompt per request), got {datatype} "
                             f"with {len(texts)}")
    prompt = _text(texts[0], "text_input")
    if not prompt:
        raise InvalidRequest("'text_input' is empty; give at least one character")
    options = _from_json(inputs["sampling_parameters"][1]) if "sampling_parameters" in inputs else {}
    for name in SCALARS:
        if name in inputs:
            options[name] = _scalar(name, *inputs[name])
    if "stop" in inputs:
        datatype, stops = inputs["stop"]
        if datatype != "BYTES":
            raise InvalidRequest(f"input 'stop' has datatype {datatype}; use BYTES")
        options["stop"] = [_text(s, "stop") for s in stops]
    selection = _selection(request.model_name, options.pop("lora_name", None), config)
    params = _params(options, config)
    stream, exclude = options.get("stream", False), options.get("exclude_input_in_output", True)
    for name, value in (("stream", stream), ("exclude_input_in_output", exclude)):
        if not isinstance(value, bool):
            raise InvalidRequest(f"{name} must be true or false, got {value!r}")
    return Generation(GenerateCall(prompt, selection, params, deadline), stream, "" if exclude else prompt)


def _selection(model: str, lora_name, config: ServerConfig) -> Selection:
    selection = model_selection(model, config)
    if lora_name is None:
        return selection
    if selection is not None:
        raise InvalidRequest(f"lora_name names an adapter, but model {model!r} is one already; send lora_name with "
                             f"the base, {config.model_name!r}")
    return check_id(lora_name)


def _params(options: Mapping, config: ServerConfig) -> SamplingParams:
    stop = options.get("stop", ())
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequest(f"stop must be a text or a list of texts, got {stop!r:.100}")
    max_tokens = options.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise InvalidRequest(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    return SamplingParams(max_new_tokens=config.max_new(max_tokens), temperature=options.get("temperature", 1.0),
                          top_p=options.get("top_p", 1.0), top_k=options.get("top_k", 0),
                          repetition_penalty=options.get("repetition_penalty", 1.0), stop=tuple(stop),
                          seed=options.get("seed"))


def texts_of(request: kpb.ModelInferRequest) -> tuple[str, ...]:
    """An encoder request's texts: `text_input`, one BYTES element per text."""
    inputs = inputs_of(request)
    unknown = sorted(set(inputs) - {"text_input"})
    if unknown:
        raise InvalidRequest(f"unknown input(s) {unknown}; an encoder model takes 'text_input' (BYTES, one element "
                             f"per text)")
    if "text_input" not in inputs:
        raise InvalidRequest("the request has no 'text_input' input (BYTES, one element per text)")
    datatype, values = inputs["text_input"]
    if datatype != "BYTES" or not values:
        raise InvalidRequest(f"'text_input' must be BYTES with at least one element, got {datatype} with {len(values)}")
    return tuple(_text(v, "text_input") for v in values)


# ---- tensors out -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Output:
    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes


def bytes_output(name: str, texts: Sequence[str]) -> Output:
    raw = b"".join(struct.pack("<I", len(b)) + b for b in (t.encode("utf-8") for t in texts))
    return Output(name, "BYTES", (len(texts),), raw)


def fp32_output(name: str, values: np.ndarray) -> Output:
    array = np.ascontiguousarray(values, dtype="<f4")
    return Output(name, "FP32", tuple(array.shape), array.tobytes())


def classification_outputs(results: Sequence[Classification]) -> list[Output]:
    scores = np.array([list(r.scores.values()) for r in results], dtype=np.float32)
    return [bytes_output("label", [r.label for r in results]),
            fp32_output("score", np.array([r.scores[r.label] for r in results])), fp32_output("scores", scores)]


def response(request: kpb.ModelInferRequest, outputs: Sequence[Output],
             parameters: Mapping[str, bool] | None = None) -> kpb.ModelInferResponse:
    """The answer with the outputs the request asked for (all when it named none), as raw contents."""
    wanted = [o.name for o in request.outputs]
    known = {o.name for o in outputs}
    missing = sorted(set(wanted) - known)
    if missing:
        raise InvalidRequest(f"requested output(s) {missing} are not outputs of this model; it has {sorted(known)}")
    chosen = [o for o in outputs if not wanted or o.name in wanted]
    message = kpb.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version or "1", id=request.id,
        outputs=[kpb.ModelInferResponse.InferOutputTensor(name=o.name, datatype=o.datatype, shape=o.shape)
                 for o in chosen],
        raw_output_contents=[o.raw for o in chosen])
    for key, value in (parameters or {}).items():
        message.parameters[key].bool_param = value
    return message


def tensor(name: str, datatype: str, shape: Sequence[int]) -> kpb.ModelMetadataResponse.TensorMetadata:
    return kpb.ModelMetadataResponse.TensorMetadata(name=name, datatype=datatype, shape=list(shape))


GENERATE_METADATA = (
    [tensor("text_input", "BYTES", [1]), tensor("max_tokens", "INT32", [1]), tensor("temperature", "FP32", [1]),
     tensor("top_p", "FP32", [1]), tensor("top_k", "INT32", [1]), tensor("seed", "UINT64", [1]),
     tensor("repetition_penalty", "FP32", [1]), tensor("stop", "BYTES", [-1]), tensor("stream", "BOOL", [1]),
     tensor("exclude_input_in_output", "BOOL", [1]), tensor("sampling_parameters", "BYTES", [1])],
    [tensor("text_output", "BYTES", [1])],
)
"""(inputs, outputs) of a causal-LM model."""
