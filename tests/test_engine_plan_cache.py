"""Per-layer plans cached in a BatchContext: a reused context gives the same bits as a fresh one, builds each
layer's plan once, and rebuilds it after a load / unload in its routes (the new adapter's output is used);
the Generator reuses one decode context while its running rows and the loaded adapters stay the same."""

import copy

import pytest
import torch

from adalora.engine import AdapterEngine, EngineConfig, native
from adalora.config import ConfigError
from adalora.engine.apply import Routing
from adalora.engine.cost import DEFAULT_COST, CostModel
from adalora.engine.errors import AdapterNotFound, BatchError
from adalora.engine.sampling import SamplingParams
from adalora.engine.scheduler import CompositionLife, GenerationRequest, Generator, GeneratorConfig
from tests.conftest import tiny_llama
from tests.factories import random_adapter

T = 4
ROWS = ["a", None, "b", {"a": 0.5, "b": -0.7}, "a"]


@pytest.fixture(scope="module")
def setup():
    base = tiny_llama()
    adapters = {"a": random_adapter(base, 1, init_r=4), "b": random_adapter(base, 2, init_r=6),
                "c": random_adapter(base, 3, init_r=3)}
    return base, adapters


def engine_with(setup, names=("a", "b")):
    base, adapters = setup
    engine = AdapterEngine(copy.deepcopy(base), EngineConfig(max_slots=4))
    for name in names:
        engine.load(name, adapters[name])
    return engine


def ids_for(rows):
    return (torch.arange(len(rows) * T).view(len(rows), T) * 5) % 60 + 2


@torch.no_grad()
def forward(engine, context, ids):
    with engine.batch(context):
        return engine.model(input_ids=ids).logits


def test_routing_rows_are_each_groups_tokens():
    groups = torch.tensor([2, -1, 0, 2, 0, -1, 1, 2])
    rows = Routing(groups, 4).rows
    assert len(rows) == 4
    for g, r in enumerate(rows):
        assert torch.equal(r, (groups == g).nonzero().squeeze(1))


@pytest.mark.parametrize("strategy", ["auto", "group", "packed", "padded"])
def test_reused_context_equals_fresh_context(setup, strategy):
    engine = engine_with(setup)
    ids = ids_for(ROWS)
    context = engine.context(ROWS, T, strategy)
    first = forward(engine, context, ids)
    plans = context.built_plans()
    assert len(plans) == len(engine.layers)
    second = forward(engine, context, ids)  # every layer through its cached plan
    assert all(context.built_plans()[bank] is plan for bank, plan in plans.items())
    fresh = forward(engine, engine.context(ROWS, T, strategy), ids)
    assert torch.equal(first, second) and torch.equal(second, fresh)
    if strategy != "auto":
        assert set(context.chosen_strategies()) == {strategy}


@pytest.mark.parametrize("strategy", ["auto", "group", "packed", "padded"])
def test_unload_then_load_into_the_same_slot_uses_the_new_adapter(setup, strategy):
    engine = engine_with(setup)
    ids = ids_for(ROWS)
    context = engine.context(ROWS, T, strategy)
    before = forward(engine, context, ids)
    slot = engine.slots.slot("b")
    engine.unload("b")
    assert engine.load("c", setup[1]["c"]) == slot  # the routes now read c wherever they read b
    after = forward(engine, context, ids)
    rows_c = [{"a": 0.5, "c": -0.7} if isinstance(r, dict) else ("c" if r == "b" else r) for r in ROWS]
    expected = forward(engine, engine.context(rows_c, T, strategy), ids)
    torch.testing.assert_close(after, expected, atol=1e-6, rtol=1e-6)
    changed = [i for i, r in enumerate(ROWS) if r == "b" or isinstance(r, dict)]
    unchanged = [i for i in range(len(ROWS)) if i not in changed]
    assert (after[changed] - before[changed]).abs().amax() > 1e-3  # b's rows and the mix now run c
    torch.testing.assert_close(after[unchanged], before[unchanged], atol=1e-6, rtol=1e-6)


def test_unload_alone_makes_the_cached_context_refuse(setup):
    engine = engine_with(setup)
    context = engine.context(["b"], T)
    forward(engine, context, ids_for(["b"]))
    engine.unload("b")
    with pytest.raises(AdapterNotFound, match="is empty"):
        forward(engine, context, ids_for(["b"]))


def test_load_into_another_slot_keeps_the_plans(setup):
    engine = engine_with(setup, names=("a",))
    context = engine.context(["a"], T)
    forward(engine, context, ids_for(["a"]))
    plans = context.built_plans()
    engine.load("b", setup[1]["b"])
    forward(engine, context, ids_for(["a"]))
    assert all(context.built_plans()[bank] is plan for bank, plan in plans.items())


def counting_contexts(engine):
    """Wrap engine.context to record the routing contexts the generator builds: (rows, tokens per row, the
    forwards it is expected to serve)."""
    calls = []
    build = engine.context

    def context(requests, tokens_per_row, strategy="auto", expected=1):
        calls.append((len(requests), tokens_per_row, expected))
        return build(requests, tokens_per_row, strategy, expected)

    engine.context = context
    return calls


def test_generator_builds_one_decode_context_per_batch_composition(setup):
    engine = engine_with(setup)
    gen = Generator(engine, GeneratorConfig(max_batch_size=4, eos_token_ids=()))
    greedy = lambda n: SamplingParams(max_new_tokens=n, temperature=0)  # noqa: E731
    first = [gen.submit(GenerationRequest([3, 4, 5], a, greedy(10))) for a in ("a", "b")]
    calls = counting_contexts(engine)  # after submit, which builds a one-row context to validate
    for _ in range(3):
        gen.step()  # step 1: prefill + decode (one new decode context), then two more decodes reuse it
    # a prefill serves one forward; the decode rows may run 9 more steps together (no lives seen yet)
    assert calls == [(2, [3, 3], 1), (2, 1, 9)]  # the lean prefill routes each prompt's own tokens
    gen.submit(GenerationRequest([7, 8], None, greedy(2)))  # a row joins: a new composition
    calls.clear()
    gen.step()
    gen.step()
    # the join's prefill; a decode of 3 rows, which the joined row leaves after 1 step (its 2nd token); then a
    # decode of 2 rows, expected to live round(2.5) steps: the mean of the lives seen, 3 then 1 (weight 1/4)
    assert calls == [(1, [2], 1), (3, 1, 1), (2, 1, 2)]
    assert gen.life.mean == 2.5
    engine.load("c", setup[1]["c"])  # any load / unload re-resolves the running rows' adapter ids
    calls.clear()
    gen.step()
    assert calls == [(2, 1, 2)]
    while gen.has_work():
        gen.step()
    assert all(len(h.result.token_ids) == 10 for h in first)


def test_decode_context_of_a_batch_that_requests_join_next_step_serves_one_forward(setup):
    """A request submitted while the step runs (here from a token callback) joins at the next step: the decode
    context built before that is expected to serve one forward."""
    engine = engine_with(setup)
    gen = Generator(engine, GeneratorConfig(max_batch_size=4, eos_token_ids=()))
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    late = []
    gen.submit(GenerationRequest([3, 4, 5], "a", greedy),
               on_token=lambda _: late or late.append(gen.submit(GenerationRequest([6], "b", greedy))))
    calls = counting_contexts(engine)
    gen.step()
    # the prefill, then the decode that the late request will end (its validation in submit builds no context)
    assert calls == [(1, [3], 1), (1, 1, 1)] and gen.waiting == 1
    calls.clear()
    gen.step()  # the late request joins; its rows may run 4 more steps, but the one life seen so far was 1
    assert calls == [(1, [1], 1), (2, 1, 1)] and gen.life.mean == 1


@pytest.mark.parametrize("observed,bound,expected", [
    ([], 9, 9),  # nothing seen: the fewest steps any row may still run
    ([3], 9, 3),
    ([3], 2, 2),  # never beyond what a row may still run
    ([3, 1], 9, 2),  # mean 2.5, rounded half to even
    ([1, 1, 1], 9, 1),
    ([64, 1], 60, 48),  # 64 + (1 - 64) / 4 = 48.25
])
def test_composition_life(observed, bound, expected):
    life = CompositionLife()
    for steps in observed:
        life.observe(steps)
    assert life.expect(bound) == expected


def test_context_calls_reach_auto(setup, monkeypatch):
    """A context expected to serve many forwards shares each plan's build over them: where a cost model makes
    padded the cheaper call but the dearer build, one forward picks packed and 64 forwards pick padded (the native
    segment kernel turned off: it would be the cheapest of all)."""
    monkeypatch.setattr(native, "applies", lambda *tensors: False)
    base, adapters = setup
    cost = CostModel(launch=0.0, gather=1e6, bmm=0.1, build_group=0.0, build_column=20.0)
    engine = AdapterEngine(copy.deepcopy(base), EngineConfig(max_slots=4, cost=cost))
    for adapter_id in ("a", "b"):
        engine.load(adapter_id, adapters[adapter_id])
    rows = ["a", "b", "a", "b"]
    picks = {}
    for calls in (1, 64):
        context = engine.context(rows, 1, calls=calls)
        forward(engine, context, ids_for(rows)[:, :1])
        picks[calls] = set(context.chosen_strategies())
    assert picks == {1: {"packed"}, 64: {"padded"}}


@pytest.mark.parametrize("calls", [0, -1, 1.5, True])
def test_context_refuses_calls_that_are_not_a_positive_integer(setup, calls):
    engine = engine_with(setup)
    with pytest.raises(BatchError, match="calls must be a positive integer"):
        engine.context(["a"], 1, calls=calls)


def test_engine_config_cost_model_decides_auto(setup):
    """EngineConfig.cost reaches every layer's 'auto' choice: with free launches and gathers, group (the least
    matmul work) wins where the default picks another strategy."""
    base, adapters = setup
    rows = ["a", "b", "a", "b"]
    picks = {}
    for name, cost in {"default": CostModel(), "free launches": CostModel(launch=0.0, gather=0.0)}.items():
        engine = AdapterEngine(copy.deepcopy(base), EngineConfig(max_slots=4, cost=cost))
        for adapter_id in ("a", "b"):
            engine.load(adapter_id, adapters[adapter_id])
        context = engine.context(rows, 1, calls=64)  # a decode batch that stays together
        forward(engine, context, ids_for(rows)[:, :1])
        picks[name] = set(context.chosen_strategies())
    assert picks["free launches"] == {"group"} and "group" not in picks["default"]


def test_engine_config_refuses_a_cost_that_is_not_a_cost_model():
    with pytest.raises(ConfigError, match="cost must be an engine.cost.CostModel, got str"):
        EngineConfig(cost="fast")


# ---- a bank's stack of its slots: what segment runs on when every group is one adapter ----------------------------

SINGLE_ROWS = ["a", None, "c", "a", None]
"""Every route one adapter: a segment plan runs on each bank's stack as is."""


def test_bank_stack_holds_each_slot_in_slot_order_and_the_slots_become_views_of_it(setup):
    engine = engine_with(setup, names=("a", "b", "c"))
    engine.unload("b")  # an empty slot between two loaded ones
    reference = {name: engine.slots.slot(name) for name in ("a", "c")}
    groups = torch.tensor([0, -1, 2])
    for path, bank in engine.slots.banks.items():
        before = {s: tuple(t.clone() for t in bank.get(s)) for s in reference.values()}
        stack = bank.stacked(groups)
        assert stack.groups is groups and stack.offsets.tolist()[0] == 0
        assert stack.offsets[2] == stack.offsets[1]  # slot 1 is empty: no rows
        for slot, (A, B) in before.items():
            r0, r1 = stack.offsets[slot].item(), stack.offsets[slot + 1].item()
            assert torch.equal(stack.A[r0:r1], A) and torch.equal(stack.BT[r0:r1], B.T), (path, slot)
            held = bank.get(slot)  # the slot's factors are now views of the stack, with the same values
            assert torch.equal(held.A, A) and torch.equal(held.B, B)
            assert held.A.untyped_storage().data_ptr() == stack.A.untyped_storage().data_ptr()
        assert bank.stacked(groups).A is stack.A  # built once per write


@pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable()}")
def test_segment_over_the_stack_builds_nothing_and_equals_the_reference(setup):
    engine = engine_with(setup, names=("a", "b", "c"))
    ids = ids_for(SINGLE_ROWS)
    context = engine.context(SINGLE_ROWS, T, "segment")
    got = forward(engine, context, ids)
    for bank, plan in context.built_plans().items():
        if plan is not None:
            assert plan.A is bank.stacked(context.token_slots).A  # the bank's own stack, nothing stacked per batch
    torch.testing.assert_close(got, forward(engine, engine.context(SINGLE_ROWS, T, "group"), ids),
                               atol=1e-5, rtol=1e-5)
    mixed = engine.context(ROWS, T, "segment")  # a mixture: the plan stacks its groups itself
    assert mixed.token_slots is None
    torch.testing.assert_close(forward(engine, mixed, ids_for(ROWS)),
                               forward(engine, engine.context(ROWS, T, "group"), ids_for(ROWS)), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable()}")
def test_a_load_after_the_stack_rebuilds_it_and_keeps_older_plans_right(setup):
    engine = engine_with(setup, names=("a", "b"))
    ids = ids_for(["a", "b"])
    context = engine.context(["a", "b"], T, "segment")
    before = forward(engine, context, ids)
    stacks = {bank: bank.stacked(context.token_slots).A for bank in engine.slots.banks.values()}
    engine.load("c", setup[1]["c"])  # another slot: a's and b's plans stay, over the stack they were built on
    torch.testing.assert_close(forward(engine, context, ids), before, atol=0, rtol=0)
    with_c = engine.context(["c", "a"], T, "segment")
    got = forward(engine, with_c, ids_for(["c", "a"]))
    assert all(bank.stacked(with_c.token_slots).A is not stacks[bank] for bank in engine.slots.banks.values())
    torch.testing.assert_close(got, forward(engine, engine.context(["c", "a"], T, "group"), ids_for(["c", "a"])),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens,distinct,calls", [(8, 8, 1), (8, 8, 2), (200, 8, 1), (3, 3, 1)])
def test_stacked_makes_segments_build_free(tokens, distinct, calls):
    plain = DEFAULT_COST.costs(tokens, distinct, 8 * distinct, 12, calls=calls, segment=True)
    stacked = DEFAULT_COST.costs(tokens, distinct, 8 * distinct, 12, calls=calls, segment=True, stacked=True)
    build = DEFAULT_COST.cost({"build": 1, "build_segment": distinct, "build_column": 8 * distinct})
    assert stacked["segment"] == pytest.approx(plain["segment"] - build / calls)
    assert {k: v for k, v in stacked.items() if k != "segment"} == {k: v for k, v in plain.items() if k != "segment"}
