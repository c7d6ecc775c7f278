"""The static-shape decode step that engine.graphs captures as CUDA graphs, here run eagerly on the CPU (capture
off): every logit of each step equals the transformers forward of that row alone (the lean tests' Harness), while
rows leave and join across batch buckets, the cache grows under it, a mixture falls back to the eager lean step,
and adapters load into a running batch in place or past the padded rank. tests/test_cuda.py runs the same
scenario with the graphs captured and replayed on a GPU."""

import pytest
import torch

from adalora.engine import graphs
from adalora.engine.graphs import DecodeGraphs, PaddedFactors, bucket, row_buckets, width_bucket
from tests.factories import random_adapter
from tests.test_engine_lean import BY_NAME, CASES, MIX, Harness


def graphed(name: str, device: str = "cpu", capture: bool = False, **harness) -> Harness:
    h = Harness.make(BY_NAME[name], **harness, device=device)
    h.lean.graphs = DecodeGraphs(h.lean, capture=capture)
    return h


def static_scenario(h: Harness, case_name: str) -> dict:
    """Steps across buckets, a cache that grows, a mixture, in-place and reallocating loads; every logit checked
    (Harness.decode). Returns the graphs' counters."""
    g = h.lean.graphs
    h.prefill([[3, 17, 9, 40, 22, 5, 11], [5], [8, 1, 30, 30]], ["a", None, "b"])
    for step in range(3):  # 3 rows: the 4-row bucket, one padding row
        h.decode(f"static step {step}")
    assert g.eager == 0
    h.keep([0, 2])  # 2 rows: the 2-row bucket
    h.decode("after keep")
    h.prefill([[12, 13, 50, 2, 9, 33, 60, 1, 4, 7, 7, 21]], ["b"])  # joins, longer than the cache's first columns
    h.decode("after a join")
    steps = g.eager
    h.prefill([[4, 4, 4]], [MIX])  # a mixture has no one slot per row: the lean path's own step
    h.decode("with a mixture")
    assert g.eager == steps + 1
    h.keep([0, 1, 2])
    h.decode("the mixture left")
    assert g.eager == steps + 1
    h.keep([1])
    h.decode("one row")
    case = BY_NAME[case_name]
    base, targets = case.build(), case.targets[0]
    held = {projection: factors.AT for projection, factors in g.factors.items()}
    h.engine.load("c", random_adapter(base, 3, init_r=4, lora_alpha=5.0, targets=targets))  # rank <= 8: in place
    h.prefill([[9, 8, 7]], ["c"])
    h.decode("a loaded adapter joins")
    assert all(factors.AT is held[projection] for projection, factors in g.factors.items())
    h.engine.unload("a")
    h.engine.load("d", random_adapter(base, 4, init_r=16, lora_alpha=5.0, targets=targets))  # past the padding
    h.prefill([[2, 2, 3]], ["d"])
    h.decode("an adapter past the padded rank joins")
    h.keep([0, 1])
    h.prefill([[6, 1]], [None])
    h.decode("the base joins")
    h.keep([2])
    h.decode("the base alone")
    assert g.routed == 4  # the prefills with an adapter and no mixture: the first, then b, c and d joining
    return {"replays": g.replays, "captures": g.captures, "eager": g.eager, "failed": g.failed,
            "reallocated": any(factors.AT is not held[projection] for projection, factors in g.factors.items())}


@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_static_step_equals_each_row_alone(name):
    counts = static_scenario(graphed(name, capacity=8), name)
    assert counts == {"replays": 0, "captures": 0, "eager": 1, "failed": None, "reallocated": True}


def test_buckets():
    assert row_buckets(1) == (1,) and row_buckets(8) == (1, 2, 4, 8) and row_buckets(12) == (1, 2, 4, 8, 12)
    assert [bucket(n, (1, 2, 4, 8, 12)) for n in (1, 3, 8, 9, 12, 13)] == [1, 4, 8, 12, 12, None]
    assert [width_bucket(c, 4096) for c in (1, 64, 65, 200)] == [64, 64, 128, 256]
    assert width_bucket(65, 100) == 100


@pytest.mark.parametrize("chunk_rows", [None, 2])
def test_padded_factors_equal_each_slots_own_delta(chunk_rows, monkeypatch):
    """x @ AT[s] @ BT[s] of every slot (and the zero slot) against x @ A.T @ B.T of that slot's own factors, each
    part into its own columns; in one batched matmul, or in chunks of 2 rows (a long prefill's)."""
    h = Harness.make(BY_NAME["varied-llama"])
    qkv = h.lean.layers[0].qkv
    padded = PaddedFactors(qkv.parts, *qkv.dense.weight.shape[::-1])
    assert padded.refresh() and not padded.refresh()
    x = torch.randn(5, padded.shape[0])
    slots = torch.tensor([0, 1, padded.slots, 1, 0])
    y = torch.zeros(5, padded.shape[1])
    if chunk_rows is not None:
        per_row = (padded.AT[0].numel() + padded.BT[0].numel()) * 4
        monkeypatch.setattr(graphs, "GATHER_BYTES", per_row * chunk_rows + 1)
    padded.add_to(y, x, slots)
    want = torch.zeros_like(y)
    for i, slot in enumerate(slots.tolist()):
        for bank, columns in qkv.parts:
            factors = bank.factors(slot) if slot < padded.slots else None
            if factors is not None:
                want[i, columns] += x[i] @ factors.A.T @ factors.B.T
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_windows_narrower_than_the_cache(monkeypatch):
    """Windows of 4, 8 and 16 columns over a 64-column cache: each row's mask, not the cache's end, bounds what it
    reads."""
    monkeypatch.setattr(graphs, "MIN_WIDTH", 4)
    counts = static_scenario(graphed("varied-llama"), "varied-llama")
    assert counts["eager"] == 1 and counts["failed"] is None


def test_a_row_left_as_nan_does_not_reach_the_next_occupant_of_its_cache_row():
    """A request whose adapter overflowed leaves NaN keys and values; once it leaves, its columns are zeroed, so a
    shorter request in that cache row reads zeros, not NaN, under its window's mask (a masked NaN is still NaN)."""
    h = graphed("varied-llama")
    h.prefill([[3, 17, 9, 40, 22, 5, 11, 8, 8, 8, 8, 8], [5, 6]], ["a", "b"])
    h.decode()
    cache = h.lean.cache
    cache.keys[:, 0, :, :13] = float("nan")  # row 0 overflowed
    cache.values[:, 0, :, :13] = float("nan")
    h.keep([1])  # it leaves; row 1 moves down into its cache row
    assert torch.isfinite(cache.keys).all() and torch.isfinite(cache.values).all()
    h.prefill([[4, 4]], ["a"])
    h.decode("after a NaN row left")  # the reference check fails on a NaN logit


def test_a_capture_that_fails_leaves_every_step_eager_and_right():
    """Where a graph cannot be captured (here: no CUDA at all), the warning names why and each step runs the lean
    path's own, with the same logits."""
    h = graphed("varied-llama", capture=True)
    h.prefill([[3, 17, 9], [5]], ["a", None])
    h.decode("first step")
    h.decode("second step")
    g = h.lean.graphs
    assert g.failed is not None and g.replays == 0 and g.eager >= 1 and not g.graphs


def test_a_refresh_that_fails_halfway_starts_over(monkeypatch):
    """Out of memory while the padded factors are reallocated: the step raises, and the next refresh rebuilds
    them from nothing instead of trusting a half-written state."""
    h = graphed("varied-llama")
    zeros, calls = torch.zeros, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # BT, after AT of the first projection
            raise RuntimeError("CUDA out of memory (simulated)")
        return zeros(*args, **kwargs)

    monkeypatch.setattr(graphs.torch, "zeros", failing)
    with pytest.raises(RuntimeError, match="out of memory"):  # the prefill's route refreshes first
        h.prefill([[3, 17, 9], [5]], ["a", "b"])
    monkeypatch.setattr(graphs.torch, "zeros", zeros)
    factors = next(iter(h.lean.graphs.factors.values()))
    assert factors.AT is None and factors.generations == [] and h.lean.cache.rows == 0  # its rows closed again
    h.prefill([[3, 17, 9], [5]], ["a", "b"])
    h.decode("after the failed refresh")
