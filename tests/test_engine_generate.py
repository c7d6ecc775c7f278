"""Continuous batching: every greedy request of a mixed, changing batch equals the same request run alone by
a naive no-cache greedy loop on the base with its adapter merged; seeds, stops, eos, streaming, errors."""

import asyncio
import copy

import pytest
import torch

from adalora.config import ConfigError
from adalora.engine import AdapterEngine, EdgeMerger, EngineConfig
from adalora.engine.errors import AdapterNotFound, EngineError, InvalidRequest
from adalora.engine.sampling import SamplingParams
from adalora.engine.scheduler import GenerationRequest, Generator, GeneratorConfig
from adalora.engine import stream as stream_module
from adalora.engine.stream import AsyncDriver
from tests.factories import random_adapter, varied_llama
from adalora.tools.merge import MergeParams, merge_adapters

MIX = {"a": 0.6, "c": 0.8}


@pytest.fixture(scope="module")
def setup():
    base = varied_llama()
    adapters = {"a": random_adapter(base, 1, init_r=4, lora_alpha=8.0),
                "b": random_adapter(base, 2, init_r=6, lora_alpha=3.0, targets=("q_proj", "v_proj", "down_proj")),
                "c": random_adapter(base, 3, init_r=3, lora_alpha=6.0, targets=("k_proj", "o_proj", "up_proj"))}
    return base, adapters


def generator(setup, max_batch_size=8, eos=(), tokenizer=None) -> Generator:
    base, adapters = setup
    engine = AdapterEngine(copy.deepcopy(base), EngineConfig(max_slots=4))
    for name, adapter in adapters.items():
        engine.load(name, adapter)
    return Generator(engine, GeneratorConfig(max_batch_size=max_batch_size, eos_token_ids=eos), tokenizer)


def merged_model(setup, adapter):
    """A fresh base with `adapter` merged into its weights (a mixture: its linear merge)."""
    base, adapters = setup
    model = copy.deepcopy(base)
    if isinstance(adapter, dict):
        EdgeMerger(model).activate(merge_adapters([adapters[k] for k in adapter], "linear",
                                                  MergeParams(weights=tuple(adapter.values()))))
    elif adapter is not None:
        EdgeMerger(model).activate(adapters[adapter])
    return model


@torch.no_grad()
def naive_greedy(model, prompt, n):
    """Reference: re-run the whole sequence for every new token (no cache, no padding, batch of one)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def run_schedule(gen, schedule):
    """schedule: (step at which to submit, request); returns the handles in schedule order and the largest
    number of rows that ran together; a request submitted at step s > 0 joins rows already decoding."""
    handles, step, widest = [None] * len(schedule), 0, 0
    while step == 0 or gen.has_work() or any(h is None for h in handles):
        for i, (at, request) in enumerate(schedule):
            if at == step:
                handles[i] = gen.submit(request)
        gen.step()
        widest = max(widest, gen.running)
        step += 1
    return handles, widest


def greedy(prompt, adapter, n, **params):
    return GenerationRequest(prompt, adapter, SamplingParams(max_new_tokens=n, temperature=0, **params))


# (submit at step, prompt, adapter, max_new_tokens): different adapters, base rows, a mix, prompt lengths and
# lengths; with max_batch_size 4 some wait for a row to retire, others join while rows are decoding.
MIXED = [
    (0, [3, 17, 9, 40, 22], "a", 12),
    (0, [5], None, 3),
    (0, [8, 1, 30, 30, 2, 61, 7, 19, 44], MIX, 9),
    (0, [12, 13], "b", 14),
    (0, [50, 4, 4], "c", 5),
    (2, [33, 21, 9], None, 8),
    (3, [7, 7, 1, 60], "b", 1),
    (5, [2, 9, 27, 5, 11, 3], "a", 10),
    (6, [41, 16], MIX, 6),
]


def test_mixed_continuous_batch_equals_each_request_alone_merged(setup):
    gen = generator(setup, max_batch_size=4)
    assert gen.decoder.name == "lean"
    shapes = []  # (rows, tokens per row) of every forward: a decode feeds one token per row, never the prefix
    gen.engine.model.model.embed_tokens.register_forward_pre_hook(lambda m, args: shapes.append(args[0].shape))
    handles, widest = run_schedule(gen, [(at, greedy(p, ad, n)) for at, p, ad, n in MIXED])
    assert widest == 4
    prefills = [s for s in shapes if s[1] > 1]
    # each prefill packs its prompts unpadded into one row, and each prompt is prefilled once
    assert len(prefills) < len(MIXED) and {s[0] for s in prefills} == {1}
    assert sum(s[1] for s in prefills) == sum(len(p) for _, p, _, _ in MIXED)
    assert len(shapes) - len(prefills) <= max(n for *_, n in MIXED) + len(MIXED)
    base_model = merged_model(setup, None)
    for (at, prompt, adapter, n), handle in zip(MIXED, handles):
        expected = naive_greedy(merged_model(setup, adapter), prompt, n)
        assert handle.result.token_ids == expected, f"{adapter} {prompt}"
        assert handle.result.finish_reason == "length"
        assert (handle.result.prompt_tokens, handle.result.completion_tokens) == (len(prompt), n)
        if n >= 8:  # the reference is not degenerate, and the adapter changes it
            assert len(set(expected)) >= 3, expected
            if adapter is not None:
                assert expected != naive_greedy(base_model, prompt, n)


def test_naive_reference_equals_transformers_generate(setup):
    model = merged_model(setup, "a")
    prompt = [3, 17, 9, 40, 22]
    hf = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert hf[0, len(prompt):].tolist() == naive_greedy(model, prompt, 10)


def sampled(prompt, adapter, seed, n=12):
    return GenerationRequest(prompt, adapter, SamplingParams(max_new_tokens=n, temperature=1.3, top_k=30, top_p=0.95,
                                                             repetition_penalty=1.2, seed=seed))


def test_seeded_request_is_the_same_whatever_shares_its_batch(setup):
    target = sampled([4, 9, 31], "b", seed=11)
    alone, _ = run_schedule(generator(setup), [(0, target)])
    companions = [(0, sampled([1, 2, 3, 4, 5, 6, 7], "a", seed=1)), (0, greedy([9], None, 3)),
                  (2, target), (2, sampled([60, 61], MIX, seed=None, n=20)), (4, sampled([8, 8], "c", seed=5, n=4))]
    crowded, _ = run_schedule(generator(setup, max_batch_size=3), companions)
    assert crowded[2].result.token_ids == alone[0].result.token_ids
    other_seed, _ = run_schedule(generator(setup), [(0, sampled([4, 9, 31], "b", seed=12))])
    assert other_seed[0].result.token_ids != alone[0].result.token_ids


class WordTokenizer:
    """decode(ids) = 'w<id> w<id> ...', enough to test stop strings."""

    def decode(self, ids):
        return " ".join(f"w{t}" for t in ids)


def test_stop_sequences_and_eos_retire_rows_early_and_others_continue(setup):
    long_prompt, n = [3, 17, 9, 40, 22], 12
    free = naive_greedy(merged_model(setup, "a"), long_prompt, n)
    short_prompt = [12, 13]
    short_free = naive_greedy(merged_model(setup, "b"), short_prompt, 14)
    k = next(i for i in range(3, n) if free[i] not in free[:i] and free[i] not in short_free)
    eos_at = next(i for i in range(2, 14) if short_free[i] not in short_free[:i] and short_free[i] not in free)
    cases = [  # (request, expected ids, reason)
        (greedy(long_prompt, "a", n, stop=(tuple(free[k - 1:k + 1]),)), free[:k + 1], "stop"),
        (greedy(long_prompt, "a", n, stop=(f"w{free[k - 1]} w{free[k]}",)), free[:k + 1], "stop"),
        (greedy(long_prompt, "a", n, stop=((63, 63, 63), (free[k],))), free[:k + 1], "stop"),
        (greedy(short_prompt, "b", 14), short_free[:eos_at + 1], "eos"),
        (greedy(long_prompt, "a", n), free, "length"),
    ]
    gen = generator(setup, eos=(short_free[eos_at],), tokenizer=WordTokenizer())
    handles, _ = run_schedule(gen, [(0, request) for request, _, _ in cases])
    for (request, expected, reason), handle in zip(cases, handles):
        assert (handle.result.token_ids, handle.result.finish_reason) == (expected, reason), request.params.stop
        assert handle.result.completion_tokens == len(expected)


def test_ignore_eos_goes_on_past_the_eos_token_to_max_new_tokens(setup):
    prompt = [12, 13]
    free = naive_greedy(merged_model(setup, "b"), prompt, 14)
    eos_at = next(i for i in range(2, 13) if free[i] not in free[:i])
    gen = generator(setup, eos=(free[eos_at],))
    stops, goes_on = (gen.submit(greedy(prompt, "b", 14, ignore_eos=flag)) for flag in (False, True))
    while gen.has_work():
        gen.step()
    assert (stops.result.token_ids, stops.result.finish_reason) == (free[:eos_at + 1], "eos")
    assert (goes_on.result.token_ids, goes_on.result.finish_reason) == (free, "length")
    with pytest.raises(InvalidRequest, match="ignore_eos must be true or false"):
        SamplingParams(ignore_eos="yes")


def test_callbacks_and_async_stream_yield_the_final_tokens(setup):
    requests = [greedy([3, 17, 9], "a", 9), greedy([5, 6], MIX, 4), sampled([1, 2], None, seed=3, n=7)]
    seen = {i: [] for i in range(len(requests))}
    gen = generator(setup)
    handles = [gen.submit(r, on_token=seen[i].append) for i, r in enumerate(requests)]
    while gen.has_work():
        gen.step()
    assert all(seen[i] == h.result.token_ids for i, h in enumerate(handles))

    async def main():
        driver = AsyncDriver(generator(setup, max_batch_size=2))
        try:
            async def collect(request):
                stream = driver.stream(request)
                return [t async for t in stream], stream.result
            results = await asyncio.gather(*(collect(r) for r in requests))
            whole = await driver.generate(requests[0])
        finally:
            driver.close()
        return results, whole

    results, whole = asyncio.run(main())
    for (tokens, result), handle in zip(results, handles):
        assert tokens == result.token_ids == handle.result.token_ids
    assert whole == handles[0].result


@pytest.mark.parametrize("gather_s", [0.0, 0.5])
def test_an_idle_driver_gathers_a_burst_into_one_prefill(setup, gather_s, monkeypatch):
    """Three requests 50 ms apart: gathered (each within 0.5 s of the last; the bound raised for the test, so that a
    busy machine cannot flake it), one prefill admits all three; not gathered, the first prefills alone. A lone
    request still runs (it waits one gap), and the tokens are the same either way."""
    monkeypatch.setattr(stream_module, "GATHER_MAX_S", 2.0)
    gen = generator(setup)
    admitted, take = [], gen._take_waiting

    def recording():
        new, expired = take()
        if new:
            admitted.append(len(new))
        return new, expired

    gen._take_waiting = recording
    requests = [greedy([3, 17, 9], "a", 4), greedy([5, 6], None, 4), greedy([1, 2], "b", 4)]

    async def main():
        driver = AsyncDriver(gen, gather_s=gather_s)
        try:
            streams = []
            for request in requests:
                streams.append(driver.stream(request))
                await asyncio.sleep(0.05)
            for stream in streams:
                async for _ in stream:
                    pass
            alone = await driver.generate(requests[0])
            return [stream.result for stream in streams], alone
        finally:
            driver.close()

    results, alone = asyncio.run(main())
    assert admitted[0] == (3 if gather_s else 1) and admitted[-1] == 1, admitted
    reference = generator(setup)
    handles = [reference.submit(r) for r in requests]
    while reference.has_work():
        reference.step()
    assert [r.token_ids for r in results] == [h.result.token_ids for h in handles]
    assert alone.token_ids == handles[0].result.token_ids


@pytest.mark.parametrize("gather_s", [-0.001, 1.0, True, "0.004"])
def test_a_bad_gather_is_refused(setup, gather_s):
    with pytest.raises(EngineError, match=r"gather_s must be a number of seconds in \[0, 0.025\]"):
        AsyncDriver(generator(setup), gather_s=gather_s)


def test_a_failing_step_ends_every_stream_with_its_error(setup):
    async def main():
        gen = generator(setup)
        driver = AsyncDriver(gen)
        try:
            stream = driver.stream(greedy([1, 2, 3], "a", 30))
            first = await stream.__anext__()
            gen.engine.unload("a")  # the next decode cannot route this row
            with pytest.raises(AdapterNotFound):
                async for _ in stream:
                    pass
            return first
        finally:
            driver.close()
    assert isinstance(asyncio.run(main()), int)


def test_a_failing_admission_ends_the_requests_it_took_off_the_queue(setup):
    """Taken off the queue and not yet in a row when the prefill raised: they end with its error (fail_all, which
    the driver calls next, only sees rows and the queue), instead of never ending."""
    gen = generator(setup)
    first, second = gen.submit(greedy([1, 2], "a", 3)), gen.submit(greedy([4], None, 3))

    def broken(*args, **kwargs):
        raise RuntimeError("prefill failed")

    gen.engine.context = broken
    with pytest.raises(RuntimeError, match="prefill failed"):
        gen.step()
    assert [str(h.error) for h in (first, second)] == ["prefill failed"] * 2 and first.done and second.done
    assert gen.fail_all(RuntimeError("again")) == [] and not gen.has_work()


# (request, error class, fragment of its message)
INVALID_REQUESTS = [
    (GenerationRequest([], None), InvalidRequest, "prompt must be a non-empty sequence of token ids"),
    (GenerationRequest("hello", None), InvalidRequest, "tokenize text first"),
    (GenerationRequest([1, 64], None), InvalidRequest, "prompt token ids must be integers in [0, 64), got [64]"),
    (GenerationRequest([1, -1, 2.0], None), InvalidRequest, "got [-1, 2.0]"),
    (greedy([1] * 60, None, 5), InvalidRequest, "= 65 exceeds the model's 64 positions"),
    (greedy([1], None, 3, stop=("END",)), InvalidRequest, "need a tokenizer: create the Generator with tokenizer="),
    (greedy([1], "zzz", 3), AdapterNotFound, "zzz"),
    (greedy([1], {}, 3), EngineError, "empty mixture"),
    (GenerationRequest([1], None, params={"temperature": 0}), InvalidRequest, "params must be SamplingParams"),
    ([1, 2], InvalidRequest, "submit a GenerationRequest, got list"),
]


@pytest.mark.parametrize("request_,error,message", INVALID_REQUESTS, ids=[m for _, _, m in INVALID_REQUESTS])
def test_invalid_requests_are_refused_at_submit(setup, request_, error, message):
    gen = generator(setup)
    with pytest.raises(error) as info:
        gen.submit(request_)
    assert message in str(info.value)
    assert not gen.has_work()


@pytest.mark.parametrize("fields,message", [
    (dict(max_batch_size=0), "max_batch_size must be a positive integer"),
    (dict(eos_token_ids=[2]), "eos_token_ids must be a tuple of token ids"),
    (dict(eos_token_ids=(-1,)), "eos_token_ids must be a tuple of token ids"),
    (dict(strategy="fast"), "unknown apply strategy 'fast'"),
])
def test_invalid_generator_config(fields, message):
    with pytest.raises(ConfigError) as info:
        GeneratorConfig(**fields)
    assert message in str(info.value)


def test_default_eos_comes_from_the_generation_config(setup):
    gen = Generator(AdapterEngine(copy.deepcopy(setup[0])))
    assert gen.eos == {setup[0].generation_config.eos_token_id}
