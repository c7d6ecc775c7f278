"""inference.GRPCInferenceService (Open Inference Protocol v2: KServe / Triton) over a real gRPC channel with our own
generated stubs, on a tiny random Llama with 5 preloaded adapters and 2 stored-only ones, and on a tiny BERT with
seq-cls and feature adapters: liveness and readiness follow attach and drain; metadata names each model's tensors;
ModelInfer and the decoupled ModelStreamInfer (raw and typed contents, sampling_parameters JSON with lora_name)
equal the in-process Generator and EncoderRunner; every refusal has its status code and no traceback or server path;
the repository extension lists, loads and unloads under the admin token; grpc.health.v1 List, reflection v1 and
v1alpha, and the requests counter see the service."""

from __future__ import annotations

import json
import struct
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from adalora.engine import GenerationRequest, Generator, GeneratorConfig, SamplingParams
from adalora.server.config import ServerConfig
from adalora.server.gen.grpc.reflection.v1 import reflection_pb2 as rpb
from adalora.server.gen.grpc.reflection.v1 import reflection_pb2_grpc as rgrpc
from adalora.server.gen.inference import grpc_service_pb2 as kpb
from adalora.server.gen.inference import grpc_service_pb2_grpc as kgrpc
from tests.factories import ENCODER_TEXTS, random_adapter, varied_llama
from tests.server_setup import (ServerThread, encoder_server, reference_engine, status_of,
                                 word_tokenizer, write_base, write_store)

BASE = "tiny-llama"
"""The causal base's served name (--served-model-name)."""
IDS = ("a0", "a1", "a2", "a3", "a4")
"""Preloaded adapters."""
COLD = ("cold", "cold2")
"""Adapters in the store that no inference request names (they stay unloaded unless a test loads them)."""
TOKEN = "t"
MAX_NEW = 12
PROMPT = "w5 w9 w13 w7"
FINAL = "triton_final_response"
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
KSERVICE = "inference.GRPCInferenceService"

DTYPES = {"BOOL": ("bool_contents", "<?"), "INT32": ("int_contents", "<i4"), "INT64": ("int64_contents", "<i8"),
          "UINT64": ("uint64_contents", "<u8"), "FP32": ("fp32_contents", "<f4"), "FP64": ("fp64_contents", "<f8")}
"""Datatype -> (InferTensorContents field, little-endian raw dtype), as the protocol defines them."""


# ---- tensors ---------------------------------------------------------------------------------------------------

def raw_bytes(*elements: bytes) -> bytes:
    """A raw BYTES tensor: each element a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def parse_bytes(raw: bytes) -> list[bytes]:
    out, at = [], 0
    while at < len(raw):
        (size,) = struct.unpack_from("<I", raw, at)
        out.append(raw[at + 4:at + 4 + size])
        at += 4 + size
    assert at == len(raw), "a raw BYTES output that does not end on an element"
    return out


def infer_request(model: str, inputs, raw: bool = True, id: str = "", outputs=()) -> kpb.ModelInferRequest:
    """inputs: (name, datatype, values[, shape]); raw=True puts every input in raw_input_contents, False in the
    typed `contents` fields."""
    message = kpb.ModelInferRequest(model_name=model, id=id, outputs=[
        kpb.ModelInferRequest.InferRequestedOutputTensor(name=name) for name in outputs])
    for name, datatype, values, *shape in inputs:
        values = [v.encode() if isinstance(v, str) else v for v in values]
        tensor = message.inputs.add(name=name, datatype=datatype, shape=shape[0] if shape else [len(values)])
        if datatype == "BYTES":
            if raw:
                message.raw_input_contents.append(raw_bytes(*values))
            else:
                tensor.contents.bytes_contents.extend(values)
        elif datatype not in DTYPES:  # a datatype the protocol does not have: its raw bytes as given
            message.raw_input_contents.append(bytes(values))
        else:
            field, dtype = DTYPES[datatype]
            if raw:
                message.raw_input_contents.append(np.array(values, dtype=dtype).tobytes())
            else:
                getattr(tensor.contents, field).extend(values)
    return message


def gen_inputs(prompt: str = PROMPT, max_tokens: int | None = 8, temperature: float | None = 0.0, *extra):
    """text_input, max_tokens (INT32), temperature (FP32) and any extra input tuples."""
    inputs = [("text_input", "BYTES", [prompt])]
    if max_tokens is not None:
        inputs.append(("max_tokens", "INT32", [max_tokens]))
    if temperature is not None:
        inputs.append(("temperature", "FP32", [temperature]))
    return [*inputs, *extra]


def sampling(**options):
    return ("sampling_parameters", "BYTES", [json.dumps(options)])


def outputs_of(response: kpb.ModelInferResponse) -> dict[str, tuple[str, list[int], object]]:
    """{name: (datatype, shape, values)}: BYTES as a list of str, FP32 as an array of the tensor's shape."""
    assert len(response.raw_output_contents) == len(response.outputs)
    out = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        shape = list(tensor.shape)
        if tensor.datatype == "BYTES":
            values = [b.decode("utf-8") for b in parse_bytes(raw)]
            assert [len(values)] == shape
        else:
            assert tensor.datatype == "FP32"
            values = np.frombuffer(raw, dtype="<f4").reshape(shape)
        out[tensor.name] = (tensor.datatype, shape, values)
    return out


def text_of(response: kpb.ModelInferResponse) -> str:
    outputs = outputs_of(response)
    assert list(outputs) == ["text_output"]
    datatype, shape, values = outputs["text_output"]
    assert (datatype, shape) == ("BYTES", [1])
    return values[0]


def final_of(response: kpb.ModelInferResponse) -> bool | None:
    return response.parameters[FINAL].bool_param if FINAL in response.parameters else None


def clean(details: str, root) -> bool:
    """An error message fit for a client: no traceback, no server path."""
    return ("Traceback" not in details and 'File "' not in details and str(root) not in details
            and "/tmp" not in details and "site-packages" not in details)


# ---- servers ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    root = tmp_path_factory.mktemp("kserve")
    base, tokenizer = varied_llama(), word_tokenizer()
    adapters = {adapter_id: random_adapter(base, 40 + i, init_r=2 + i % 3)
                for i, adapter_id in enumerate(IDS + COLD)}
    config = ServerConfig(base_model=str(write_base(base, root / "llama", tokenizer)),
                          adapter_dir=str(write_store(root / "adapters", adapters)), preload=IDS, port=0,
                          max_batch_size=4, max_prompt_tokens=20, max_new_tokens=MAX_NEW, default_max_new_tokens=4,
                          served_model_name=BASE, admin_token=TOKEN, reflection=True)
    server = ServerThread(config)
    channel = grpc.insecure_channel(server.target)
    yield SimpleNamespace(server=server, channel=channel, stub=kgrpc.GRPCInferenceServiceStub(channel), base=base,
                          adapters=adapters, tokenizer=tokenizer, root=root, references={})
    channel.close()
    server.stop()


def reference(ctx, adapter: str | None, prompt: str, params: SamplingParams) -> str:
    """The text of the same request alone on an in-process Generator over the same base and adapter."""
    key = (adapter, prompt, params)
    if key not in ctx.references:
        loaded = {} if adapter is None else {adapter: ctx.adapters[adapter]}
        generator = Generator(reference_engine(ctx.base, loaded, max_slots=2), GeneratorConfig(max_batch_size=1),
                              tokenizer=ctx.tokenizer)
        handle = generator.submit(GenerationRequest(ctx.tokenizer(prompt)["input_ids"], adapter, params))
        while generator.has_work():
            generator.step()
        ctx.references[key] = ctx.tokenizer.decode(handle.result.token_ids, skip_special_tokens=True)
    return ctx.references[key]


def greedy(n: int, **kwargs) -> SamplingParams:
    return SamplingParams(n, temperature=0, **kwargs)


# ---- 1. liveness and readiness ----------------------------------------------------------------------------------

def test_liveness_and_readiness_follow_attach_and_drain(causal):
    config = ServerConfig(base_model=str(causal.root / "llama"), adapter_dir=str(causal.root / "adapters"),
                          preload=("a0",), port=0, max_new_tokens=MAX_NEW,
                          default_max_new_tokens=4)  # served name: the folder's, "llama"
    server = ServerThread(config, attach=False)
    channel = grpc.insecure_channel(server.target)
    stub, health = kgrpc.GRPCInferenceServiceStub(channel), health_pb2_grpc.HealthStub(channel)
    ready = lambda name: stub.ModelReady(kpb.ModelReadyRequest(name=name), timeout=30).ready  # noqa: E731
    try:
        assert stub.ServerLive(kpb.ServerLiveRequest(), timeout=30).live
        assert not stub.ServerReady(kpb.ServerReadyRequest(), timeout=30).ready
        assert not ready("llama") and not ready("a0")
        statuses = health.List(health_pb2.HealthListRequest(), timeout=30).statuses
        assert statuses[KSERVICE].status == health_pb2.HealthCheckResponse.NOT_SERVING
        loading = [lambda: stub.ModelInfer(infer_request("llama", gen_inputs(max_tokens=2)), timeout=30),
                   lambda: stub.ModelMetadata(kpb.ModelMetadataRequest(name="llama"), timeout=30),
                   lambda: stub.RepositoryIndex(kpb.RepositoryIndexRequest(), timeout=30)]
        for call in loading:
            code, details = status_of(call)
            assert code == grpc.StatusCode.UNAVAILABLE and "still loading" in details, details
        [answer] = stub.ModelStreamInfer(iter([infer_request("llama", gen_inputs(max_tokens=2), id="x")]), timeout=30)
        assert answer.error_message.startswith("UNAVAILABLE:") and answer.infer_response.id == "x"

        server.attach()
        assert stub.ServerLive(kpb.ServerLiveRequest(), timeout=30).live
        assert stub.ServerReady(kpb.ServerReadyRequest(), timeout=30).ready
        expected = {"llama": True, "a0": True, "a1": False, "cold": False, "nope": False, "Org/Model": False,
                    BASE: False, "": False}  # a1 / cold: stored, not loaded; BASE: the other server's name
        assert {name: ready(name) for name in expected} == expected
        assert health.Check(health_pb2.HealthCheckRequest(service=KSERVICE), timeout=30).status == \
            health_pb2.HealthCheckResponse.SERVING

        server.server.gate.draining = True
        try:
            assert not stub.ServerReady(kpb.ServerReadyRequest(), timeout=30).ready
            assert stub.ServerLive(kpb.ServerLiveRequest(), timeout=30).live
            assert not ready("llama") and not ready("a0")
            code, details = status_of(loading[0])
            assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details
        finally:
            server.server.gate.draining = False
        assert stub.ServerReady(kpb.ServerReadyRequest(), timeout=30).ready and ready("a0")
        assert text_of(stub.ModelInfer(infer_request("a0", gen_inputs(max_tokens=3)), timeout=60)) == \
            reference(causal, "a0", PROMPT, greedy(3))
    finally:
        channel.close()
        server.stop()


# ---- 2. metadata ------------------------------------------------------------------------------------------------

def test_server_metadata(causal):
    answer = causal.stub.ServerMetadata(kpb.ServerMetadataRequest(), timeout=30)
    assert answer.name == "adalora" and answer.version
    assert "model_repository" in answer.extensions


def tensors(metadata) -> dict[str, str]:
    return {t.name: t.datatype for t in metadata}


@pytest.mark.parametrize("name", [BASE, "a0", "cold"])
def test_model_metadata_of_a_causal_model(causal, name):
    answer = causal.stub.ModelMetadata(kpb.ModelMetadataRequest(name=name), timeout=30)
    assert answer.name == name and list(answer.versions) == ["1"]
    inputs = tensors(answer.inputs)
    assert inputs["text_input"] == "BYTES" and inputs["sampling_parameters"] == "BYTES"
    assert inputs["max_tokens"] == "INT32" and inputs["stream"] == "BOOL"
    assert tensors(answer.outputs) == {"text_output": "BYTES"}
    assert not causal.stub.ModelReady(kpb.ModelReadyRequest(name="cold"), timeout=30).ready  # metadata loads nothing


@pytest.mark.parametrize("name", ["nope", "Org/Model", ""])
def test_model_metadata_of_an_unknown_model_is_not_found(causal, name):
    code, details = status_of(lambda: causal.stub.ModelMetadata(kpb.ModelMetadataRequest(name=name), timeout=30))
    assert code == NOT_FOUND and clean(details, causal.root), details


# ---- 3. ModelInfer on the causal base ---------------------------------------------------------------------------

INFER_CASES = [  # (id, model, inputs, raw, requested outputs, (reference adapter, SamplingParams), prefix)
    ("a0-raw", "a0", gen_inputs(max_tokens=8), True, (), ("a0", greedy(8)), ""),
    ("a1-typed", "a1", gen_inputs(max_tokens=9), False, (), ("a1", greedy(9)), ""),
    ("base-lora-a2-json", BASE, [("text_input", "BYTES", [PROMPT]), sampling(lora_name="a2", max_tokens=8,
                                                                             temperature=0)],
     True, (), ("a2", greedy(8)), ""),
    ("a3-explicit-wins-over-json", "a3", gen_inputs(max_tokens=7) + [sampling(max_tokens=2, temperature=0.9)],
     False, (), ("a3", greedy(7)), ""),
    ("a4-stop-and-penalty", "a4", gen_inputs("w20 w21 w22", 10, 0.0, ("stop", "BYTES", ["w27", "w9 w9"]),
                                             ("repetition_penalty", "FP64", [1.3])),
     True, (), ("a4", greedy(10, stop=("w27", "w9 w9"), repetition_penalty=1.3)), ""),  # "w27" is met
    ("base", BASE, gen_inputs("w20 w21", 6), True, (), (None, greedy(6)), ""),
    ("base-prefix", BASE, gen_inputs("w20 w21", 5, 0.0, ("exclude_input_in_output", "BOOL", [False])), False, (),
     (None, greedy(5)), "w20 w21"),
    ("a1-outputs-filter", "a1", gen_inputs("w30 w31", 6), True, ("text_output",), ("a1", greedy(6)), ""),
    ("a2-int64-uint64-2d", "a2", [("text_input", "BYTES", ["w30 w31"], [1, 1]), ("max_tokens", "INT64", [6]),
                                  ("temperature", "FP64", [0.0]), ("seed", "UINT64", [2**64 - 1]),
                                  ("top_k", "INT64", [0]), ("stream", "BOOL", [False])],
     False, (), ("a2", greedy(6, seed=2**64 - 1)), ""),
    ("a3-default-max-tokens", "a3", gen_inputs("w40", None), True, (), ("a3", greedy(4)), ""),  # the server's 4
    ("a0-json-prefix-typed", "a0", [("text_input", "BYTES", ["w11 w12"]),
                                    sampling(max_tokens=5, temperature=0, exclude_input_in_output=False)],
     False, (), ("a0", greedy(5)), "w11 w12"),
]


def prompt_of(inputs) -> str:
    return next(values[0] for name, _, values, *_ in inputs if name == "text_input")


def test_concurrent_model_infer_equals_the_in_process_generator(causal):
    futures = [causal.stub.ModelInfer.future(infer_request(model, inputs, raw, id=case_id, outputs=outputs),
                                             timeout=60)
               for case_id, model, inputs, raw, outputs, _, _ in INFER_CASES]
    texts = set()
    for (case_id, model, inputs, _, _, (adapter, params), prefix), future in zip(INFER_CASES, futures):
        answer = future.result()
        assert (answer.id, answer.model_name, answer.model_version) == (case_id, model, "1")
        want = reference(causal, adapter, prompt_of(inputs), params)
        assert text_of(answer) == prefix + want, case_id
        texts.add(want)
    assert len(texts) >= 5  # the adapters change the text: a server mixing them up could not pass
    unstopped = reference(causal, "a4", "w20 w21 w22", greedy(10, repetition_penalty=1.3))
    stopped = reference(causal, "a4", "w20 w21 w22", greedy(10, stop=("w27", "w9 w9"), repetition_penalty=1.3))
    assert stopped != unstopped and unstopped.startswith(stopped) and stopped.endswith("w27")  # the stop input works


# ---- 4. ModelStreamInfer ----------------------------------------------------------------------------------------

STREAM_OK = [  # (id, model, inputs, raw, (adapter, params), prefix, streamed)
    ("s-a0", "a0", gen_inputs("w5 w6 w7", 8, 0.0, ("stream", "BOOL", [True])), True, ("a0", greedy(8)), "", True),
    ("s-base-lora-a1", BASE, [("text_input", "BYTES", ["w5 w6 w7"]), ("stream", "BOOL", [True]),
                              sampling(lora_name="a1", max_tokens=7, temperature=0)],
     False, ("a1", greedy(7)), "", True),
    ("s-a2-unary", "a2", gen_inputs("w5 w6 w7", 6), False, ("a2", greedy(6)), "", False),
    ("s-a3-prefix", "a3", gen_inputs("w8 w9", 6, 0.0, ("stream", "BOOL", [True]),
                                     ("exclude_input_in_output", "BOOL", [False])), True, ("a3", greedy(6)),
     "w8 w9", True),
    ("s-base-unary", BASE, gen_inputs("w8 w9", 5), True, (None, greedy(5)), "", False),
]
STREAM_BAD = [  # (id, model, inputs, status name)
    ("bad-model", "nope", gen_inputs("w5", 3, 0.0, ("stream", "BOOL", [True])), "NOT_FOUND"),
    ("bad-name", "Org/Model", gen_inputs("w5", 3), "NOT_FOUND"),
    ("bad-input", "a0", gen_inputs("w5", 3, 0.0, ("foo", "INT32", [1])), "INVALID_ARGUMENT"),
    ("bad-cap", "a0", gen_inputs("w5", MAX_NEW + 1, 0.0, ("stream", "BOOL", [True])), "INVALID_ARGUMENT"),
]


def stream(ctx, requests) -> dict[str, list[kpb.ModelStreamInferResponse]]:
    """Every answer of one ModelStreamInfer stream carrying `requests`, grouped by request id, in arrival order."""
    by_id: dict[str, list] = {}
    for answer in ctx.stub.ModelStreamInfer(iter(requests), timeout=60):
        by_id.setdefault(answer.infer_response.id, []).append(answer)
    return by_id


def test_a_stream_answers_each_request_by_id(causal):
    requests = [infer_request(model, inputs, raw, id=case_id) for case_id, model, inputs, raw, *_ in STREAM_OK]
    requests[2:2] = [infer_request(model, inputs, id=case_id) for case_id, model, inputs, _ in STREAM_BAD]
    by_id = stream(causal, requests)
    assert set(by_id) == {case[0] for case in STREAM_OK + STREAM_BAD}
    for case_id, model, inputs, _, (adapter, params), prefix, streamed in STREAM_OK:
        answers = by_id[case_id]
        assert not any(a.error_message for a in answers), (case_id, answers[0].error_message)
        responses = [a.infer_response for a in answers]
        assert all(r.model_name == model for r in responses)
        want = prefix + reference(causal, adapter, prompt_of(inputs), params)
        assert [final_of(r) for r in responses] == [False] * (len(responses) - 1) + [True], case_id
        if streamed:
            assert len(responses) >= 3, case_id  # chunks, then the final (empty) response
            assert "".join(text_of(r) for r in responses) == want, case_id
        else:
            assert len(responses) == 1 and text_of(responses[0]) == want, case_id
    for case_id, model, _, status in STREAM_BAD:
        [answer] = by_id[case_id]
        assert answer.error_message.startswith(f"{status}:"), (case_id, answer.error_message)
        assert clean(answer.error_message, causal.root)
        assert answer.infer_response.model_name == model


def test_a_refused_streamed_request_with_the_prompt_echo_gets_only_its_error(causal):
    echo = ("exclude_input_in_output", "BOOL", [False])
    requests = [infer_request("nope", gen_inputs("w5 w6", 3, 0.0, ("stream", "BOOL", [True]), echo), id="e1"),
                infer_request("a0", gen_inputs(" ".join(["w5"] * 21), 3, 0.0, ("stream", "BOOL", [True]), echo),
                              id="e2")]  # unknown adapter; prompt over --max-prompt-tokens 20
    by_id = stream(causal, requests)
    assert [a.error_message.split(":")[0] for a in by_id["e1"]] == ["NOT_FOUND"]
    assert [a.error_message.split(":")[0] for a in by_id["e2"]] == ["INVALID_ARGUMENT"]


def test_a_unary_refusal_with_the_prompt_echo_is_an_error_status(causal):
    """ModelInfer with the echo collects the whole text first: the refusal is a status, not a half answer."""
    echo = ("exclude_input_in_output", "BOOL", [False])
    code, details = status_of(lambda: causal.stub.ModelInfer(infer_request("nope", gen_inputs("w5", 3, 0.0, echo)),
                                                             timeout=30))
    assert code == NOT_FOUND and "'nope'" in details


# ---- 6. refusals ------------------------------------------------------------------------------------------------

def _with_raw(inputs, raw_contents) -> kpb.ModelInferRequest:
    message = infer_request("a0", inputs)
    del message.raw_input_contents[:]
    message.raw_input_contents.extend(raw_contents)
    return message


def _typed_in_the_wrong_field() -> kpb.ModelInferRequest:
    message = infer_request("a0", gen_inputs(max_tokens=None, temperature=None), raw=False)
    message.inputs.add(name="temperature", datatype="FP32", shape=[1]).contents.int_contents.append(0)
    return message


def _given_twice() -> kpb.ModelInferRequest:
    return infer_request("a0", gen_inputs(max_tokens=3) + [("max_tokens", "INT32", [4])])


ERROR_CASES = [  # (id, request, status, a fragment of the message)
    ("no-text-input", infer_request("a0", [("max_tokens", "INT32", [3])]), INVALID, "no 'text_input'"),
    ("no-inputs", infer_request("a0", []), INVALID, "no 'text_input'"),
    ("two-prompts", infer_request("a0", [("text_input", "BYTES", ["w5", "w6"])]), INVALID, "one element"),
    ("text-input-int32", infer_request("a0", [("text_input", "INT32", [5])]), INVALID, "BYTES"),
    ("empty-prompt", infer_request("a0", gen_inputs("", 3)), INVALID, "empty"),
    ("shape-count-mismatch", infer_request("a0", [("text_input", "BYTES", ["w5"], [2])]), INVALID, "shape"),
    ("negative-shape", infer_request("a0", [("text_input", "BYTES", ["w5"], [-1])]), INVALID, "negative"),
    ("unknown-datatype", infer_request("a0", [("text_input", "STRING", [], [0])]), INVALID, "datatype"),
    ("typed-in-the-wrong-field", _typed_in_the_wrong_field(), INVALID, "temperature"),
    ("given-twice", _given_twice(), INVALID, "twice"),
    ("raw-count", _with_raw(gen_inputs(max_tokens=3), [raw_bytes(b"w5")]), INVALID, "raw_input_contents"),
    ("raw-bytes-truncated", _with_raw([("text_input", "BYTES", ["w5"])], [struct.pack("<I", 9) + b"w5"]), INVALID,
     "runs past"),
    ("raw-bytes-short-length", _with_raw([("text_input", "BYTES", ["w5"])], [raw_bytes(b"w5") + b"\x01"]), INVALID,
     "4-byte length"),
    ("raw-int32-ragged", _with_raw(gen_inputs(max_tokens=3, temperature=None),
                                   [raw_bytes(b"w5"), b"\x03\x00\x00"]), INVALID, "whole number"),
    ("invalid-utf8", infer_request("a0", [("text_input", "BYTES", [b"w5 \xff\xfe"])]), INVALID, "UTF-8"),
    ("unknown-input", infer_request("a0", gen_inputs(max_tokens=3) + [("foo", "INT32", [1])]), INVALID, "'foo'"),
    ("unknown-json-key", infer_request("a0", gen_inputs(max_tokens=3) + [sampling(beam_width=2)]), INVALID,
     "beam_width"),
    ("non-json", infer_request("a0", gen_inputs(max_tokens=3) + [("sampling_parameters", "BYTES", ["{nope"])]),
     INVALID, "not JSON"),
    ("json-not-an-object", infer_request("a0", gen_inputs(max_tokens=3) + [("sampling_parameters", "BYTES",
                                                                             ["[1, 2]"])]), INVALID, "JSON object"),
    ("json-temperature-text", infer_request("a0", gen_inputs(max_tokens=3, temperature=None)
                                            + [sampling(temperature="hot")]), INVALID, "temperature"),
    ("lora-name-with-an-adapter", infer_request("a0", gen_inputs(max_tokens=3) + [sampling(lora_name="a1")]),
     INVALID, "lora_name"),
    ("lora-name-malformed", infer_request(BASE, gen_inputs(max_tokens=3) + [sampling(lora_name="../etc")]),
     INVALID, "must match"),
    ("lora-name-unknown", infer_request(BASE, gen_inputs(max_tokens=3) + [sampling(lora_name="nope")]), NOT_FOUND,
     "'nope'"),
    ("max-tokens-over-cap", infer_request("a0", gen_inputs(max_tokens=MAX_NEW + 1)), INVALID, f"cap of {MAX_NEW}"),
    ("max-tokens-zero", infer_request("a0", gen_inputs(max_tokens=0)), INVALID, "max_tokens"),
    ("max-tokens-fp32", infer_request("a0", gen_inputs(max_tokens=None) + [("max_tokens", "FP32", [3.0])]),
     INVALID, "max_tokens"),
    ("temperature-negative", infer_request("a0", gen_inputs(max_tokens=3, temperature=-1.0)), INVALID,
     "temperature"),
    ("stream-int32", infer_request("a0", gen_inputs(max_tokens=3) + [("stream", "INT32", [1])]), INVALID, "stream"),
    ("stop-int32", infer_request("a0", gen_inputs(max_tokens=3) + [("stop", "INT32", [1])]), INVALID, "stop"),
    ("stream-true-on-model-infer", infer_request("a0", gen_inputs(max_tokens=3) + [("stream", "BOOL", [True])]),
     INVALID, "ModelStreamInfer"),
    ("prompt-too-long", infer_request("a0", gen_inputs(" ".join(["w5"] * 21), 3)), INVALID, "limit of 20"),
    ("unknown-output", infer_request("a0", gen_inputs(max_tokens=2), outputs=("text_output", "logits")), INVALID,
     "'logits'"),
    ("unknown-model", infer_request("nope", gen_inputs(max_tokens=3)), NOT_FOUND, "'nope'"),
    ("malformed-model-name", infer_request("Org/Model", gen_inputs(max_tokens=3)), NOT_FOUND, "not served here"),
    ("no-model-name", infer_request("", gen_inputs(max_tokens=3)), NOT_FOUND, "not served here"),
]


@pytest.mark.parametrize("request_, code, fragment", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_model_infer_refusals(causal, request_, code, fragment):
    got, details = status_of(lambda: causal.stub.ModelInfer(request_, timeout=30))
    assert got == code and fragment in details, details
    assert clean(details, causal.root), details


def test_refusals_leave_stored_adapters_unloaded(causal):
    for name in ("cold", "cold2", "nope"):
        assert not causal.stub.ModelReady(kpb.ModelReadyRequest(name=name), timeout=30).ready


# ---- 7. the repository extension --------------------------------------------------------------------------------

def admin(token: str | None = TOKEN):
    return {"metadata": [] if token is None else [("authorization", f"Bearer {token}")], "timeout": 30}


def index(ctx, ready: bool = False) -> dict[str, str]:
    models = ctx.stub.RepositoryIndex(kpb.RepositoryIndexRequest(ready=ready), timeout=30).models
    assert models[0].name == BASE and all(m.version == "1" for m in models)
    assert all(bool(m.reason) == (m.state != "READY") for m in models)
    return {m.name: m.state for m in models}


def test_repository_index_lists_the_base_and_the_store(causal):
    assert index(causal) == {BASE: "READY", **{i: "READY" for i in IDS}, **{i: "UNAVAILABLE" for i in COLD}}
    assert index(causal, ready=True) == {BASE: "READY", **{i: "READY" for i in IDS}}


def test_repository_load_and_unload_under_the_admin_token(causal):
    stub = causal.stub
    ready = lambda name: stub.ModelReady(kpb.ModelReadyRequest(name=name), timeout=30).ready  # noqa: E731
    load = lambda name, **kw: stub.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name=name), **kw)  # noqa
    unload = lambda name, **kw: stub.RepositoryModelUnload(  # noqa: E731
        kpb.RepositoryModelUnloadRequest(model_name=name), **kw)
    for call in (load, unload):
        assert status_of(lambda: call("cold2", **admin(None)))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert status_of(lambda: call("cold2", **admin("wrong")))[0] == grpc.StatusCode.PERMISSION_DENIED
        assert status_of(lambda: call(BASE, **admin(None)))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert not ready("cold2")

    load("cold2", **admin())
    assert ready("cold2") and index(causal)["cold2"] == "READY"
    load("cold2", **admin())  # already loaded: still fine
    assert ready("cold2")
    unload("cold2", **admin())
    assert not ready("cold2") and index(causal)["cold2"] == "UNAVAILABLE"

    with_parameters = kpb.RepositoryModelLoadRequest(model_name="cold2", parameters={
        "config": kpb.ModelRepositoryParameter(string_param="{}")})
    unload_unknown = kpb.RepositoryModelUnloadRequest(model_name="a0", parameters={
        "force": kpb.ModelRepositoryParameter(bool_param=True)})
    refusals = [  # (call, status, fragment)
        (lambda: load(BASE, **admin()), INVALID, "base model"),
        (lambda: unload(BASE, **admin()), INVALID, "base model"),
        (lambda: stub.RepositoryModelLoad(with_parameters, **admin()), INVALID, "no parameters"),
        (lambda: stub.RepositoryModelUnload(unload_unknown, **admin()), INVALID, "force"),
        (lambda: load("nope", **admin()), NOT_FOUND, "'nope'"),
        (lambda: unload("nope", **admin()), NOT_FOUND, "'nope'"),
        (lambda: unload("cold", **admin()), NOT_FOUND, "not loaded"),
        (lambda: load("Org/Model", **admin()), INVALID, "must match"),
    ]
    for call, code, fragment in refusals:
        got, details = status_of(call)
        assert (got, fragment in details) == (code, True), details
        assert clean(details, causal.root), details
    assert not ready("cold2") and not ready("cold") and ready("a0")
    unload_dependents = kpb.RepositoryModelUnloadRequest(model_name="a4", parameters={
        "unload_dependents": kpb.ModelRepositoryParameter(bool_param=True)})
    stub.RepositoryModelUnload(unload_dependents, **admin())
    assert not ready("a4")
    load("a4", **admin())
    assert ready("a4")
    assert index(causal) == {BASE: "READY", **{i: "READY" for i in IDS}, **{i: "UNAVAILABLE" for i in COLD}}


# ---- 8. health ---------------------------------------------------------------------------------------------------

def test_health_list_names_every_service(causal):
    health = health_pb2_grpc.HealthStub(causal.channel)
    statuses = health.List(health_pb2.HealthListRequest(), timeout=30).statuses
    for service in ("", "adalora.v1.AdaLora", KSERVICE):
        assert statuses[service].status == health_pb2.HealthCheckResponse.SERVING, service
    assert health.Check(health_pb2.HealthCheckRequest(service=KSERVICE), timeout=30).status == \
        health_pb2.HealthCheckResponse.SERVING


# ---- 9. reflection -----------------------------------------------------------------------------------------------

REFLECTED = {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection", KSERVICE,
             "adalora.v1.AdaLora", "grpc.health.v1.Health"}


def test_reflection_v1_lists_and_describes_the_inference_service(causal):
    stub = rgrpc.ServerReflectionStub(causal.channel)
    requests = [rpb.ServerReflectionRequest(list_services=""),
                rpb.ServerReflectionRequest(file_containing_symbol=KSERVICE),
                rpb.ServerReflectionRequest(file_containing_symbol="inference.ModelInferRequest")]
    listed, by_service, by_message = stub.ServerReflectionInfo(iter(requests), timeout=30)
    assert {s.name for s in listed.list_services_response.service} >= REFLECTED
    for answer, wanted in ((by_service, "GRPCInferenceService"), (by_message, None)):
        assert answer.WhichOneof("message_response") == "file_descriptor_response"
        files = [descriptor_pb2.FileDescriptorProto.FromString(b)
                 for b in answer.file_descriptor_response.file_descriptor_proto]
        inference = [f for f in files if f.package == "inference"]
        assert inference, [f.name for f in files]
        assert "GRPCInferenceService" in {s.name for f in inference for s in f.service}
        assert "ModelInferRequest" in {m.name for f in inference for m in f.message_type}


def test_reflection_v1alpha_with_grpcio_reflections_own_client(causal):
    database = ProtoReflectionDescriptorDatabase(causal.channel)
    assert set(database.get_services()) >= REFLECTED
    assert database.FindFileContainingSymbol(KSERVICE).package == "inference"


# ---- 10. metrics -------------------------------------------------------------------------------------------------

def requests_counted(ctx) -> dict[tuple[str, str, str], float]:
    text = generate_latest(ctx.server.server.metrics.registry).decode()
    return {(s.labels["rpc"], s.labels["adapter"], s.labels["status"]): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "adalora_requests_total"}


def test_requests_are_counted_by_status(causal):
    stub = causal.stub
    stub.ModelInfer(infer_request("a1", gen_inputs(max_tokens=2)), timeout=60)
    status_of(lambda: stub.ModelInfer(infer_request("a1", gen_inputs(max_tokens=2) + [("foo", "BOOL", [True])]),
                                      timeout=30))
    status_of(lambda: stub.ModelInfer(infer_request("nope", gen_inputs(max_tokens=2)), timeout=30))
    list(stub.ModelStreamInfer(iter([infer_request("a2", gen_inputs(max_tokens=2), id="m1"),
                                     infer_request("nope", gen_inputs(max_tokens=2), id="m2")]), timeout=60))
    counted = requests_counted(causal)
    assert counted[("ModelInfer", "a1", "OK")] >= 1
    assert counted[("ModelInfer", "a1", "INVALID_ARGUMENT")] >= 1
    assert counted[("ModelInfer", "__unknown__", "NOT_FOUND")] >= 1
    assert counted[("ModelStreamInfer", "a2", "OK")] >= 1
    assert counted[("ModelStreamInfer", "__unknown__", "NOT_FOUND")] >= 1


def test_a_base_request_is_counted_under_the_base_label(causal):
    causal.stub.ModelInfer(infer_request(BASE, gen_inputs("w44", 2)), timeout=60)
    counted = requests_counted(causal)
    assert counted.get(("ModelInfer", "", "OK"), 0) >= 1
    assert ("ModelInfer", "__unknown__", "OK") not in counted


# ---- 5. the encoder ----------------------------------------------------------------------------------------------

TEXTS = ENCODER_TEXTS
BERT = "tiny-bert"
"""The encoder base's folder, and so its served name (no --served-model-name)."""


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("kserve-encoder")
    server, runner, _ = encoder_server(root, BERT)
    channel = grpc.insecure_channel(server.target)
    yield SimpleNamespace(server=server, channel=channel, stub=kgrpc.GRPCInferenceServiceStub(channel),
                          runner=runner, root=root)
    channel.close()
    server.stop()


@pytest.mark.parametrize("adapter, texts, raw", [("sent", TEXTS, True), ("topic", TEXTS, False),
                                                 ("topic", TEXTS[:1], True)])
def test_encoder_classify_equals_the_in_process_runner(encoder, adapter, texts, raw):
    answer = encoder.stub.ModelInfer(infer_request(adapter, [("text_input", "BYTES", texts)], raw, id="c"),
                                     timeout=30)
    assert (answer.id, answer.model_name) == ("c", adapter)
    outputs = outputs_of(answer)
    want = encoder.runner.classify(texts, [adapter] * len(texts))
    labels = len(want[0].scores)
    assert list(outputs) == ["label", "score", "scores"]
    assert outputs["label"][:2] == ("BYTES", [len(texts)]) and outputs["label"][2] == [w.label for w in want]
    assert outputs["score"][:2] == ("FP32", [len(texts)])
    assert outputs["scores"][:2] == ("FP32", [len(texts), labels])
    np.testing.assert_allclose(outputs["score"][2], [w.scores[w.label] for w in want], rtol=0, atol=1e-6)
    np.testing.assert_allclose(outputs["scores"][2], [list(w.scores.values()) for w in want], rtol=0, atol=1e-6)


@pytest.mark.parametrize("model, selection", [(BERT, None), ("feat", "feat")])
def test_encoder_embedding_equals_the_in_process_runner(encoder, model, selection):
    answer = encoder.stub.ModelInfer(infer_request(model, [("text_input", "BYTES", TEXTS)], raw=False), timeout=30)
    outputs = outputs_of(answer)
    want = encoder.runner.embed(TEXTS, [selection] * len(TEXTS), normalize=False)
    assert list(outputs) == ["embedding"]
    datatype, shape, values = outputs["embedding"]
    assert (datatype, shape) == ("FP32", [len(TEXTS), 32])
    torch.testing.assert_close(torch.from_numpy(values.copy()), want, rtol=0, atol=1e-5)


def test_encoder_outputs_filter(encoder):
    answer = encoder.stub.ModelInfer(infer_request("sent", [("text_input", "BYTES", TEXTS)], outputs=("scores",)),
                                     timeout=30)
    assert list(outputs_of(answer)) == ["scores"]


@pytest.mark.parametrize("name, outputs", [("sent", {"label": "BYTES", "score": "FP32", "scores": "FP32"}),
                                           (BERT, {"embedding": "FP32"}), ("feat", {"embedding": "FP32"})])
def test_encoder_model_metadata(encoder, name, outputs):
    answer = encoder.stub.ModelMetadata(kpb.ModelMetadataRequest(name=name), timeout=30)
    assert tensors(answer.inputs) == {"text_input": "BYTES"}
    assert tensors(answer.outputs) == outputs


def test_encoder_readiness_uses_the_folder_name(encoder):
    ready = lambda name: encoder.stub.ModelReady(kpb.ModelReadyRequest(name=name), timeout=30).ready  # noqa: E731
    assert ready(BERT) and ready("sent") and not ready("nope") and not ready(BASE)


ENCODER_ERRORS = [  # (id, request, status, fragment)
    ("text-input-int32", infer_request("sent", [("text_input", "INT32", [5])]), INVALID, "BYTES"),
    ("no-text-input", infer_request("sent", []), INVALID, "text_input"),
    ("unknown-input", infer_request("sent", [("text_input", "BYTES", TEXTS), ("max_tokens", "INT32", [3])]),
     INVALID, "max_tokens"),
    ("over-max-inputs", infer_request("sent", [("text_input", "BYTES", TEXTS * 2)]), INVALID, "limit of 4"),
    ("embedding-of-a-classifier", infer_request("sent", [("text_input", "BYTES", TEXTS)], outputs=("embedding",)),
     INVALID, "'embedding'"),
    ("invalid-utf8", infer_request("sent", [("text_input", "BYTES", [b"\xff"])]), INVALID, "UTF-8"),
    ("unknown-model", infer_request("nope", [("text_input", "BYTES", TEXTS)]), NOT_FOUND, "'nope'"),
    ("malformed-model-name", infer_request("Org/Model", [("text_input", "BYTES", TEXTS)]), NOT_FOUND,
     "not served here"),
]


@pytest.mark.parametrize("request_, code, fragment", [c[1:] for c in ENCODER_ERRORS],
                         ids=[c[0] for c in ENCODER_ERRORS])
def test_encoder_refusals(encoder, request_, code, fragment):
    got, details = status_of(lambda: encoder.stub.ModelInfer(request_, timeout=30))
    assert got == code and fragment in details, details
    assert clean(details, encoder.root), details


def test_encoder_model_metadata_of_an_unknown_model(encoder):
    for name in ("nope", "Org/Model"):
        code, _ = status_of(lambda: encoder.stub.ModelMetadata(kpb.ModelMetadataRequest(name=name), timeout=30))
        assert code == NOT_FOUND, name


def test_encoder_on_a_stream_answers_once(encoder):
    requests = [infer_request("sent", [("text_input", "BYTES", TEXTS)], id="e1"),
                infer_request("nope", [("text_input", "BYTES", TEXTS)], id="e2")]
    by_id: dict[str, list] = {}
    for answer in encoder.stub.ModelStreamInfer(iter(requests), timeout=30):
        by_id.setdefault(answer.infer_response.id, []).append(answer)
    [ok], [bad] = by_id["e1"], by_id["e2"]
    assert not ok.error_message and list(outputs_of(ok.infer_response)) == ["label", "score", "scores"]
    assert bad.error_message.startswith("NOT_FOUND:")


def test_an_encoder_answer_on_a_stream_is_final(encoder):
    [answer] = encoder.stub.ModelStreamInfer(iter([infer_request("sent", [("text_input", "BYTES", TEXTS)])]),
                                             timeout=30)
    assert final_of(answer.infer_response) is True



@pytest.mark.parametrize("options", ['{"temperature": 1' + "0" * 400 + "}", '{"seed": ' + "9" * 5000 + "}",
                                     "[" * 100000])
def test_sampling_parameters_past_what_json_reads_are_invalid_argument(causal, options):
    """An overflowing number, an int past Python's digit limit, deep nesting: INVALID_ARGUMENT, never INTERNAL."""
    tensor = kpb.ModelInferRequest.InferInputTensor
    request = kpb.ModelInferRequest(model_name=IDS[0], inputs=[
        tensor(name="text_input", datatype="BYTES", shape=[1], contents=kpb.InferTensorContents(bytes_contents=[b"w5"])),
        tensor(name="sampling_parameters", datatype="BYTES", shape=[1],
               contents=kpb.InferTensorContents(bytes_contents=[options.encode()]))])
    with pytest.raises(grpc.RpcError) as info:
        causal.stub.ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
