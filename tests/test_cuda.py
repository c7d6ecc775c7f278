"""The engine, the lean decode path and the server on a CUDA device (skipped where there is none; CI has none, a
session lent a GPU runs them: docs/BENCHMARKS.md says when and with what result).

Each test is a CPU test's scenario moved to the GPU, against the same kind of reference: every logit of the lean
path's prefill and decode steps (rows leaving and joining) equals the transformers forward of that row alone on
the same device, in float32 to 1e-4 and in bfloat16 to 3e-2 of the largest logit; every apply strategy adds into the
fused projections' slices there too; the Generator's greedy tokens are the same over 'lean' and 'hf' on the GPU
and the same as on the CPU; concurrent requests to a server with --device cuda equal each request alone on an
in-process Generator."""

import copy
import os

import pytest
import torch

from adalora.engine import AdapterEngine, EngineConfig, GenerationRequest, Generator, GeneratorConfig, SamplingParams
from adalora.engine.apply import PLANS
from adalora.server.client import generate_request
from adalora.server.config import ServerConfig
from tests.factories import random_adapter, varied_llama
from tests.server_setup import ServerThread, word_tokenizer, write_base, write_store
from tests.test_engine_graphs import graphed, static_scenario
from tests.test_engine_lean import (BY_NAME, CASES, PROMPTS, SCHEDULE, SELECTIONS, Harness, greedy, outcome,
                                    prefill_decode_keep_join, run)

DEVICE = os.environ.get("ADALORA_TEST_DEVICE", "cuda")
"""The GPU these tests run on; ADALORA_TEST_DEVICE=cpu runs them here, which checks the tests themselves."""
pytestmark = pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="no CUDA device")

BF16_CASES = ("varied-llama", "llama-bias", "qwen2", "llama-partial-targets")


@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_lean_on_cuda_float32_equals_each_row_alone(name):
    prefill_decode_keep_join(Harness.make(BY_NAME[name], device=DEVICE))


@pytest.mark.parametrize("name", BF16_CASES)
def test_lean_on_cuda_bfloat16_equals_each_row_alone_within_bf16_tolerance(name):
    prefill_decode_keep_join(Harness.make(BY_NAME[name], device=DEVICE, dtype=torch.bfloat16, tol=3e-2))


@pytest.mark.parametrize("strategy", sorted(PLANS))
def test_every_apply_strategy_on_cuda(strategy):
    h = Harness.make(BY_NAME["llama-partial-targets"], strategy=strategy, device=DEVICE)
    h.prefill(PROMPTS, SELECTIONS)
    h.decode()
    h.keep([1, 2])
    h.prefill([[4, 4, 4]], [{"b": -0.5, "a": 1.5}])
    h.decode()


GRAPH_CASES = ("varied-llama", "llama-bias", "qwen2", "llama-partial-targets", "llama3-rope", "llama-head-dim-16")


@pytest.mark.parametrize("dtype,tol,names", [(torch.float32, 1e-4, GRAPH_CASES), (torch.bfloat16, 1e-1, BF16_CASES)],
                         ids=["float32", "bfloat16"])
def test_cuda_graphs_of_the_decode_step_equal_each_row_alone(dtype, tol, names):
    """engine.graphs captured and replayed: every logit of each step against the transformers forward of the row
    alone, across row buckets, a cache that grows, a mixture (eager), loads in place and past the padded rank.
    bfloat16 to 1e-1 of the largest logit: over this scenario's longer rows the eager lean path itself reaches
    3.6e-2 on the CPU (its mixture step), the graphs 7.1e-2 on an H200 (float32 holds 1e-4 on the same steps)."""
    capture = DEVICE.startswith("cuda")
    for name in names:
        counts = static_scenario(graphed(name, device=DEVICE, capture=capture, capacity=8, dtype=dtype, tol=tol),
                                 name)
        assert counts["failed"] is None and counts["eager"] == 1 and counts["reallocated"], (name, counts)
        if capture:  # buckets of 4, 2 and 1 rows, three cache sizes, a reallocation: many captures, most steps replay
            assert counts["captures"] >= 5 and counts["replays"] >= 10, (name, counts)


def generator_on(device: str, decoder: str) -> Generator:
    base = varied_llama()
    adapters = {"a": random_adapter(base, 1, init_r=4, lora_alpha=8.0),
                "b": random_adapter(base, 2, init_r=6, lora_alpha=3.0, targets=("q_proj", "v_proj", "down_proj"))}
    engine = AdapterEngine(copy.deepcopy(base).to(device), EngineConfig(max_slots=4))
    for name, adapter in adapters.items():
        engine.load(name, adapter)
    gen = Generator(engine, GeneratorConfig(max_batch_size=3, eos_token_ids=(), decoder=decoder))
    assert gen.decoder.name == decoder and engine.device.type == torch.device(device).type
    return gen


def test_generator_greedy_tokens_on_cuda_equal_lean_hf_and_the_cpu():
    results = {}
    for device, decoder in ((DEVICE, "lean"), (DEVICE, "hf"), ("cpu", "hf")):
        gen = generator_on(device, decoder)
        handles, _ = run(gen, [(at, greedy(p, s, n)) for at, p, s, n in SCHEDULE])
        results[device, decoder] = [outcome(h) for h in handles]
        if decoder == "lean" and DEVICE.startswith("cuda"):  # on by default there; a mixture's steps run eagerly
            graphs = gen.decoder.graphs
            assert graphs.failed is None and graphs.replays > 0 and graphs.eager > 0, vars(graphs)
    assert results[DEVICE, "lean"] == results[DEVICE, "hf"] == results["cpu", "hf"]
    assert sum(len(set(t)) >= 3 for t, _ in results[DEVICE, "lean"]) >= 4  # not degenerate


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_server_on_cuda_answers_concurrent_requests_as_each_alone(tmp_path, dtype):
    """float32: every reply's tokens equal the request alone on an in-process Generator over the same base and
    adapters on the GPU. bfloat16: a batch of other rows may round a near-tie differently, so each reply is checked
    for its length and the adapters for changing the tokens."""
    base, tokenizer = varied_llama(), word_tokenizer()
    ids = [f"ad-{i}" for i in range(6)]
    adapters = {adapter_id: random_adapter(base, 10 + i, init_r=2 + i % 3) for i, adapter_id in enumerate(ids)}
    config = ServerConfig(base_model=str(write_base(base, tmp_path / "base", tokenizer)), device=DEVICE, dtype=dtype,
                          adapter_dir=str(write_store(tmp_path / "adapters", adapters)), preload=tuple(ids), port=0,
                          max_batch_size=4, max_slots=8, max_prompt_tokens=20, max_new_tokens=24,
                          default_max_new_tokens=8)
    selections = [*ids, None, {"ad-1": 0.5, "ad-4": 0.7}]
    requests = [([5 + i, 9, 13 + i, 7], adapter, 8) for i, adapter in enumerate(selections)]
    server = ServerThread(config)
    try:
        futures = [server.client.stub.Generate.future(generate_request(prompt, adapter, max_new_tokens=n,
                                                                       temperature=0), timeout=120)
                   for prompt, adapter, n in requests]
        replies = [list(f.result().token_ids) for f in futures]
        assert server.backend.engine.device.type == torch.device(DEVICE).type
    finally:
        server.stop()
    torch_dtype = getattr(torch, dtype)
    engine = AdapterEngine(copy.deepcopy(base).to(DEVICE, torch_dtype), EngineConfig(max_slots=8))
    for adapter_id, adapter in adapters.items():
        engine.load(adapter_id, adapter)
    alone = []
    for prompt, adapter, n in requests:
        gen = Generator(engine, GeneratorConfig(max_batch_size=1, eos_token_ids=(tokenizer.eos_token_id,)))
        handle = gen.submit(GenerationRequest(prompt, adapter, SamplingParams(n, temperature=0)))
        while gen.has_work():
            gen.step()
        alone.append(handle.result.token_ids)
    if dtype == "float32":
        assert replies == alone
    else:
        assert all(0 < len(r) <= n for r, (_, _, n) in zip(replies, requests))
    assert len({tuple(r[:4]) for r in alone}) >= 4  # the adapters change the tokens: the check can fail
