"""Generate / GenerateStream over gRPC on a tiny random Llama with 9 adapters (8 native, 1 PEFT): concurrent
requests for different adapters, mixes and the base each equal the in-process Generator running that request
alone; streaming equals unary; every request-side refusal has its status code."""

import dataclasses

import grpc
import pytest
import torch
from transformers import LlamaForCausalLM

from adalora.config import ConfigError
from adalora.engine import GenerationRequest, Generator, GeneratorConfig, SamplingParams, native
from adalora.engine.errors import EngineError
from adalora.peft_interop import save_peft
from adalora.server.client import generate_request
from adalora.server.config import ServerConfig
from adalora.server.gen.adalora.v1 import adalora_pb2 as pb
from tests.conftest import tiny_llama_config
from tests.server_setup import (ServerThread, encoder_server, generate_alone, reference_engine, status_of,
                                word_tokenizer, write_base, write_store)
from tests.factories import varied_llama
from tests.factories import random_adapter

IDS = [f"ad-{i}" for i in range(8)]
MIX = {"ad-1": 0.5, "ad-6": 0.7}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    base, tokenizer = varied_llama(), word_tokenizer()
    adapters = {adapter_id: random_adapter(base, 10 + i, init_r=2 + i % 3) for i, adapter_id in enumerate(IDS)}
    adapters["peft.one"] = random_adapter(base, 99, targets=("q_proj", "v_proj"))
    store = {**adapters, "peft.one": lambda folder: save_peft(adapters["peft.one"], folder)}
    config = ServerConfig(base_model=str(write_base(base, root / "base", tokenizer)),
                          adapter_dir=str(write_store(root / "adapters", store)), preload=tuple(adapters), port=0,
                          max_batch_size=4, max_slots=12, max_prompt_tokens=20, max_new_tokens=24,
                          default_max_new_tokens=6)
    server = ServerThread(config)
    yield server, base, adapters, tokenizer
    server.stop()


def reference(setup, prompt_ids, adapter, params: SamplingParams) -> tuple[list[int], str]:
    """The request alone on an in-process Generator over the same base and adapters."""
    _, base, adapters, tokenizer = setup
    return generate_alone(base, adapters, tokenizer, prompt_ids, adapter, params)


CASES = [  # (prompt: text or ids, adapter, pb sampling kwargs, SamplingParams of the reference)
    *[("w5 w9 w13 w7", adapter_id, {"max_new_tokens": 8, "temperature": 0}, SamplingParams(8, temperature=0))
      for adapter_id in IDS],
    ([7, 8, 9], "peft.one", {"max_new_tokens": 10, "temperature": 0}, SamplingParams(10, temperature=0)),
    ([11, 30, 5, 6, 40], MIX, {"max_new_tokens": 7, "temperature": 0}, SamplingParams(7, temperature=0)),
    ("w20 w21", None, {"max_new_tokens": 5, "temperature": 0}, SamplingParams(5, temperature=0)),
    ("w33 w34 w35", "ad-3", {"max_new_tokens": 9, "temperature": 0.9, "top_k": 20, "seed": 7},
     SamplingParams(9, temperature=0.9, top_k=20, seed=7)),
    ([12, 13], "ad-5", {"temperature": 0.7, "top_p": 0.8, "seed": 3, "repetition_penalty": 1.3},
     SamplingParams(6, temperature=0.7, top_p=0.8, seed=3, repetition_penalty=1.3)),  # server default 6 tokens
    ("w9 w10", "ad-2", {"max_new_tokens": 20, "temperature": 0, "stop": ["w9 w9"]},  # no stop met: runs to length
     None),
]


def test_concurrent_requests_equal_the_in_process_generator(setup):
    server, *_ = setup
    tokenizer = setup[3]
    futures = [server.client.stub.Generate.future(generate_request(prompt, adapter, **kwargs), timeout=60)
               for prompt, adapter, kwargs, _ in CASES]
    for (prompt, adapter, kwargs, params), future in zip(CASES, futures):
        reply = future.result()
        if params is None:
            continue
        ids = tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else prompt
        tokens, text = reference(setup, ids, adapter, params)
        assert list(reply.token_ids) == tokens, (prompt, adapter)
        assert reply.text == text
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), len(tokens))
        t = reply.timings
        assert 0 <= t.queue_ms <= t.first_token_ms <= t.total_ms


def test_stream_equals_unary(setup):
    server, *_ = setup
    for prompt, adapter, kwargs, _ in CASES[::3]:
        unary = server.client.generate(prompt, adapter, **kwargs)
        messages = list(server.client.generate_stream(prompt, adapter, **kwargs))
        *tokens, last = messages
        assert all(len(m.token_ids) == 1 and m.finish_reason == 0 for m in tokens)
        assert [m.token_ids[0] for m in tokens] == list(unary.token_ids)
        assert "".join(m.text for m in messages) == unary.text
        assert (last.finish_reason, last.usage) == (unary.finish_reason, unary.usage) and not last.token_ids


BAD = [  # (request kwargs, status, a fragment of the message)
    ({"prompt": "", "adapter": "ad-0"}, grpc.StatusCode.INVALID_ARGUMENT, "prompt text is empty"),
    ({"prompt": [1, 2], "adapter": "ad-0", "max_new_tokens": 25}, grpc.StatusCode.INVALID_ARGUMENT, "cap of 24"),
    ({"prompt": [1, 2], "adapter": "ad-0", "temperature": -1.0}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ({"prompt": [1, 64], "adapter": "ad-0"}, grpc.StatusCode.INVALID_ARGUMENT, "[0, 64)"),
    ({"prompt": list(range(5, 26)), "adapter": "ad-0"}, grpc.StatusCode.INVALID_ARGUMENT, "limit of 20"),
    ({"prompt": [1, 2], "adapter": "../etc"}, grpc.StatusCode.INVALID_ARGUMENT, "must match"),
    ({"prompt": [1, 2], "adapter": {"ad-0": float("nan")}}, grpc.StatusCode.INVALID_ARGUMENT, "finite"),
    ({"prompt": [1, 2], "adapter": "nope"}, grpc.StatusCode.NOT_FOUND, "'nope' is not in the store"),
    ({"prompt": [1, 2], "adapter": {"ad-0": 1.0, "gone": 0.5}}, grpc.StatusCode.NOT_FOUND, "'gone'"),
]


@pytest.mark.parametrize("kwargs,code,fragment", BAD, ids=[f"{c.name}-{i}" for i, (_, c, _) in enumerate(BAD)])
def test_request_refusals(setup, kwargs, code, fragment):
    server, *_ = setup
    kwargs = dict(kwargs)
    prompt, adapter = kwargs.pop("prompt"), kwargs.pop("adapter")
    for method in (server.client.stub.Generate, lambda r, **kw: list(server.client.stub.GenerateStream(r, **kw))):
        got, details = status_of(lambda: method(generate_request(prompt, adapter, **kwargs), timeout=30))
        assert got == code and fragment in details, details


def test_no_prompt_and_encoder_rpcs_on_a_decoder(setup):
    server, *_ = setup
    code, details = status_of(lambda: server.client.stub.Generate(pb.GenerateRequest(), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "no prompt" in details
    code, details = status_of(lambda: server.client.classify(["w5"], "ad-0"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "Classify needs an encoder" in details
    assert status_of(lambda: server.client.embed(["w5"]))[0] == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("decoder", ["hf", "lean"])
def test_each_decoder_serves_the_reference_tokens(setup, decoder):
    server, *_, tokenizer = setup
    other = ServerThread(dataclasses.replace(server.config, decoder=decoder))
    try:
        assert other.backend.generator.decoder.name == decoder
        for prompt, adapter, kwargs, params in CASES[8:11]:  # a PEFT adapter, a mix, the base
            reply = other.client.stub.Generate(generate_request(prompt, adapter, **kwargs), timeout=60)
            ids = tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else prompt
            assert list(reply.token_ids) == reference(setup, ids, adapter, params)[0], (decoder, adapter)
    finally:
        other.stop()


@pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable()}")
def test_bf16_weights_serve_the_engines_tokens(tmp_path):
    """--weights bf16: the server answers with the in-process Generator's tokens over the same weights (the lean
    tests check those against the rounded reference)."""
    weights = "bf16"
    torch.manual_seed(0)
    config = tiny_llama_config()
    config.initializer_range = 0.3
    base, tokenizer = LlamaForCausalLM(config).eval(), word_tokenizer()
    adapters = {"ad": random_adapter(base, 5, init_r=3)}
    served = ServerConfig(base_model=str(write_base(base, tmp_path / "base", tokenizer)), weights=weights,
                          adapter_dir=str(write_store(tmp_path / "adapters", adapters)), preload=("ad",), port=0)
    server = ServerThread(served)
    try:
        assert server.backend.generator.decoder.weights == weights
        for adapter in ("ad", None):
            reply = server.client.stub.Generate(generate_request([5, 9, 13], adapter, max_new_tokens=8, temperature=0),
                                                timeout=60)
            generator = Generator(reference_engine(base, adapters), GeneratorConfig(max_batch_size=1, weights=weights))
            handle = generator.submit(GenerationRequest([5, 9, 13], adapter, SamplingParams(8, temperature=0)))
            while generator.has_work():
                generator.step()
            assert list(reply.token_ids) == handle.result.token_ids, adapter
    finally:
        server.stop()


def test_bf16_weights_are_refused_on_an_encoder_base(tmp_path):
    with pytest.raises(EngineError, match="--weights bf16 is the lean decoder's, for a causal LM; this base is an "
                                          "encoder"):
        encoder_server(tmp_path, weights="bf16")


@pytest.mark.parametrize("fields,message", [
    (dict(weights="int4"), "weights 'int4' is not one of"),
    (dict(weights="int8"), r"weights 'int8' is not one of \['float', 'bf16'\]"),
    (dict(weights="bf16", decoder="hf"), "--weights bf16 runs on the lean decoder over a float32 model on the CPU"),
    (dict(weights="bf16", dtype="bfloat16"), "--weights bf16 runs on the lean decoder"),
    (dict(weights="bf16", device="cuda"), "--weights bf16 runs on the lean decoder"),
])
def test_server_config_checks_weights(fields, message):
    with pytest.raises(ConfigError, match=message):
        ServerConfig(base_model="m", adapter_dir="a", **fields)


def test_the_weights_flag():
    import argparse

    from adalora.server.commands import serve as serve_command
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    assert serve_command.config_from(parser.parse_args(["--base-model", "m"])).weights == "float"
    assert serve_command.config_from(parser.parse_args(["--base-model", "m", "--weights", "bf16"])).weights == "bf16"
    for gone in ("int4", "int8"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--weights", gone])


@pytest.mark.parametrize("argv, expected", [([], "auto"), (["--decoder", "hf"], "hf"), (["--decoder", "lean"], "lean")])
def test_the_decoder_flag(argv, expected):
    import argparse

    from adalora.server.commands import serve as serve_command
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    assert serve_command.config_from(parser.parse_args(["--base-model", "m", *argv])).decoder == expected
    with pytest.raises(SystemExit):
        parser.parse_args(["--decoder", "fast"])
    with pytest.raises(ConfigError, match="decoder 'fast' is not one of"):
        ServerConfig(base_model="m", adapter_dir="a", decoder="fast")
