"""Every batched-apply strategy against a naive per-token loop of `apply_delta`, by dtype; the cost model."""

import pytest
import torch

from adalora.delta import apply_delta
from adalora.engine import native
from adalora.engine.apply import PLANS, Factors, Routing, batched_apply, make_plan
from adalora.engine.cost import CostModel, choose_strategy
from adalora.engine.slots import SlotBank

IN, OUT = 24, 20

# name: (tokens, ranks of the batch's groups, fraction of tokens on the base model (-1))
CASES = {
    "decode_mixed_with_rank0": (8, [3, 0, 5, 1], 0.25),
    "prefill_three_adapters": (64, [4, 4, 2], 0.1),
    "single_adapter": (5, [6], 0.0),
    "every_group_rank0": (6, [0, 0], 0.3),
    "all_tokens_base": (6, [2, 3], 1.0),
    "one_token": (1, [2, 7], 0.0),
    "many_groups": (40, [0, 8, 1, 3, 7, 2, 0, 5, 4, 6, 1, 2], 0.2),
}
# dtype: (atol, rtol) against a float64 reference of the same (unrounded) factors
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 4e-3)}


def make_case(name: str, seed: int = 0):
    """Random x, per-token groups (some -1) and per-group (P, lam, Q, scale) in float64."""
    tokens, ranks, base_fraction = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, IN, generator=gen, dtype=torch.float64)
    groups = torch.randint(0, len(ranks), (tokens,), generator=gen)
    groups[torch.rand(tokens, generator=gen) < base_fraction] = -1
    adapters = [(torch.randn(OUT, r, generator=gen, dtype=torch.float64) * 0.3,
                 torch.randn(r, generator=gen, dtype=torch.float64),
                 torch.randn(r, IN, generator=gen, dtype=torch.float64) * 0.3,
                 float(torch.rand((), generator=gen)) * 2 + 0.5) for r in ranks]
    return x, groups, adapters


def naive(x, groups, adapters):
    """Reference: token by token, its own adapter through the one delta formula."""
    out = torch.zeros(x.shape[0], OUT, dtype=torch.float64)
    for i in range(x.shape[0]):
        if groups[i] >= 0:
            P, lam, Q, scale = adapters[groups[i]]
            out[i] = apply_delta(x[i], P, lam, Q, scale)
    return out


def folded(adapters, dtype):
    return [Factors((Q * lam[:, None] * scale).to(dtype), P.to(dtype)) for P, lam, Q, scale in adapters]


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("strategy", [*PLANS, "auto"])
@pytest.mark.parametrize("case", list(CASES))
def test_strategy_matches_per_token_loop(case, strategy, dtype):
    x, groups, adapters = make_case(case)
    delta = batched_apply(x.to(dtype), groups, folded(adapters, dtype), strategy)
    expected = naive(x, groups, adapters)
    if delta is None:  # no group has a nonzero rank
        assert not expected.any()
        return
    assert delta.dtype == dtype and delta.shape == (x.shape[0], OUT)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(delta.double(), expected, atol=atol, rtol=rtol)
    assert not delta[groups == -1].any()


@pytest.mark.parametrize("case", list(CASES))
def test_strategies_called_directly_agree(case):
    """Each strategy's plan built and called directly (not batched_apply's rank-0 shortcut) on every case."""
    x, groups, adapters = make_case(case, seed=1)
    factors = folded(adapters, torch.float32)
    expected = naive(x, groups, adapters).float()
    for name, plan in PLANS.items():
        got = plan(Routing(groups, len(factors)), factors)(x.float())
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("strategy", list(PLANS))
@pytest.mark.parametrize("case", [c for c in CASES if any(CASES[c][1])])
def test_add_to_adds_the_delta_in_place(case, strategy, dtype):
    """plan.add_to(y, x), the layers' in-place path, leaves y + the per-token reference in y itself."""
    x, groups, adapters = make_case(case, seed=2)
    y0 = torch.randn(x.shape[0], OUT, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = y0.to(dtype)
    storage = y.data_ptr()
    PLANS[strategy](Routing(groups, len(adapters)), folded(adapters, dtype)).add_to(y, x.to(dtype))
    atol, rtol = TOLERANCES[dtype]
    assert y.data_ptr() == storage and y.dtype == dtype
    torch.testing.assert_close(y.double(), y0.to(dtype).double() + naive(x, groups, adapters), atol=atol, rtol=rtol)


def test_mixture_route_equals_weighted_sum_of_members():
    """A bank route {(s, w)} is the exact weighted sum of its members' deltas, at the summed rank."""
    x, _, adapters = make_case("decode_mixed_with_rank0")
    bank = SlotBank(IN, OUT, max_slots=4, device=torch.device("cpu"), dtype=torch.float64)
    for slot, f in enumerate(folded(adapters, torch.float64)):
        bank.set(slot, f)
    route = ((0, 0.7), (1, 2.0), (2, -0.3))  # slot 1 has rank 0 here
    mixed = bank.route(route)
    assert mixed.rank == 3 + 5
    expected = sum(w * apply_delta(x, *adapters[s]) for s, w in route)
    torch.testing.assert_close(batched_apply(x, torch.zeros(x.shape[0], dtype=torch.long), [mixed]), expected)


# (tokens, distinct, sum_rank, max_rank, calls) -> expected choice under the default cost model (fitted on the
# CPU); calls = the forwards a plan serves (1: a prefill, or a decode batch that changes at once)
CHOICES = [
    ((8, 1, 8, 8, 64), "group"),  # one adapter: no mask, no padding, no gather
    ((8, 3, 24, 12, 1), "group"),  # a plan for one forward: group builds nothing
    ((8, 3, 24, 12, 64), "packed"),  # decode, a few popular adapters: packed's extra columns are few
    ((8, 8, 64, 12, 1), "group"),
    ((8, 8, 64, 12, 64), "padded"),  # decode over 8 for 64 steps: padded's dearer build pays back
    ((16, 5, 40, 12, 16), "packed"),
    ((16, 16, 124, 12, 4), "padded"),  # decode over 16: packed multiplies every token by 124 columns
    ((32, 32, 256, 12, 64), "padded"),
    ((256, 1, 8, 8, 1), "group"),  # prefill, one adapter
    ((256, 8, 64, 12, 1), "group"),  # prefill of 8 prompts: a plan built for one call
    ((4096, 16, 128, 12, 1), "group"),  # long prefill over many adapters: packed's extra columns dominate
]
# where the native kernel runs (CPU float32): one launch per call and only each token's own ranks
SEGMENT_CHOICES = [
    ((8, 1, 8, 8, 64), "segment"),
    ((8, 3, 24, 12, 64), "segment"),
    ((8, 8, 64, 12, 64), "segment"),
    ((16, 16, 124, 12, 4), "segment"),
    ((8, 1, 8, 8, 1), "group"),  # one forward of one adapter: group builds nothing
    ((256, 8, 64, 12, 1), "segment"),  # a prefill over 8 adapters: one launch against group's 32
]


@pytest.mark.parametrize("args,expected", CHOICES, ids=[c[1] + str(c[0]) for c in CHOICES])
def test_cost_model_choice(args, expected):
    *shape, calls = args
    assert choose_strategy(*shape, calls=calls) == expected


@pytest.mark.parametrize("args,expected", SEGMENT_CHOICES, ids=[c[1] + str(c[0]) for c in SEGMENT_CHOICES])
def test_cost_model_choice_where_the_native_kernel_runs(args, expected):
    *shape, calls = args
    assert choose_strategy(*shape, calls=calls, segment=True) == expected


def test_cost_model_is_a_parameter():
    free_launches = CostModel(launch=0.0, gather=0.0)  # only the matmul work counts: group does the least
    assert choose_strategy(8, 8, 64, 12, free_launches, calls=64) == "group"
    assert choose_strategy(16, 16, 124, 12, padded=False, calls=64) == "packed"  # a padded plan would not pre-gather
    assert choose_strategy(8, 8, 64, 12, CostModel(build_group=0.0), calls=1) == "padded"  # plans build for free


def test_auto_leaves_padded_out_where_it_would_not_pregather(monkeypatch):
    """make_plan's auto offers padded only while the plan fits PaddedPlan.pregather_bytes (and the native
    kernel does not run: it would take segment)."""
    monkeypatch.setattr(native, "applies", lambda *tensors: False)
    gen = torch.Generator().manual_seed(5)
    factors = [Factors(torch.randn(8, IN, generator=gen), torch.randn(OUT, 8, generator=gen)) for _ in range(16)]
    routing = Routing(torch.arange(16), 16)  # a decode batch over 16 adapters, for 64 steps
    assert make_plan(routing, factors, calls=64).strategy == "padded"
    monkeypatch.setattr(PLANS["padded"], "pregather_bytes", 0)
    assert make_plan(routing, factors, calls=64).strategy == "packed"


@pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable()}")
def test_auto_takes_segment_where_the_native_kernel_runs():
    """float32 on the CPU: segment; float64 (or another device): never, the kernel does not run there."""
    gen = torch.Generator().manual_seed(5)
    factors = [Factors(torch.randn(8, IN, generator=gen), torch.randn(OUT, 8, generator=gen)) for _ in range(16)]
    routing = Routing(torch.arange(16), 16)
    assert make_plan(routing, factors, calls=64).strategy == "segment"
    assert make_plan(routing, [Factors(f.A.double(), f.B.double()) for f in factors], calls=64).strategy == "padded"
