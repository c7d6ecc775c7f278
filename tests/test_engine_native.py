"""The native CPU kernels (engine/native.cpp) against float64 references, their refusals, and the loader's
fallbacks: why they cannot run is said, never raised."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adalora.engine import native
from adalora.engine.apply import Factors, Routing, SegmentPlan

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable()}")


# ---- skinny_linear -------------------------------------------------------------------------------------------------

# (rows M, in K, out N): every row remainder (M % 8: the 1-7 row tiles), K % 8 (the masked tail), one-row and
# wider-than-decode inputs, empty ones
LINEAR_CASES = [(1, 8, 4), (1, 1, 1), (2, 7, 3), (3, 9, 5), (4, 16, 6), (6, 40, 9), (7, 24, 2), (8, 576, 960),
                (8, 1536, 576), (5, 37, 13), (12, 64, 10), (15, 31, 11), (16, 64, 64), (17, 33, 130), (64, 24, 7),
                (0, 8, 4), (3, 8, 0)]


@needs_native
def test_skinny_linear_takes_a_strided_input():
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(6, 40, generator=gen)[:, ::2], torch.randn(11, 20, generator=gen)
    torch.testing.assert_close(native.skinny_linear(x, w, None).double(), x.double() @ w.double().T,
                               rtol=0, atol=1e-4)


@needs_native
@pytest.mark.parametrize("x,w,bias,message", [
    (torch.randn(2, 4, dtype=torch.float64), torch.randn(3, 4), None, "x must be a float32 CPU tensor"),
    (torch.randn(2, 4), torch.randn(3, 5), None, r"x \(M, K\) and w \(N, K\)"),
    (torch.randn(2, 4), torch.randn(4, 3).T, None, "w must be contiguous"),
    (torch.randn(2, 4), torch.randn(3, 4), torch.randn(4), r"bias must be \(N,\)"),
], ids=["dtype", "shapes", "strided-w", "bias"])
def test_skinny_linear_refuses_what_it_cannot_compute(x, w, bias, message):
    with pytest.raises(RuntimeError, match=message):
        native.skinny_linear(x, w, bias)


@needs_native
def test_bf16_linear_refuses_float32_weights():
    with pytest.raises(RuntimeError, match=r"w must be a contiguous \(N, K\) bfloat16"):
        native.bf16_linear(torch.randn(2, 4), torch.randn(3, 4), None)


def run_kernel(kernel, x, w, b):
    """(the kernel's x @ W.T + b, the weights W it multiplied by: w, or bf16's rounded w)."""
    if kernel == "skinny_linear":
        return native.skinny_linear(x, w, b), w
    w16 = w.to(torch.bfloat16)
    return native.bf16_linear(x, w16, b), w16.float()


@needs_native
@pytest.mark.parametrize("kernel,M,K,N", [("skinny_linear", *case) for case in LINEAR_CASES]
                         + [("bf16_linear", *case) for case in LINEAR_CASES])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_linear_kernels_equal_f_linear(kernel, M, K, N, bias):
    gen = torch.Generator().manual_seed(M * 1000 + K * 10 + N)
    x, w = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen)
    b = torch.randn(N, generator=gen) if bias else None
    got, weights = run_kernel(kernel, x, w, b)
    want = F.linear(x.double(), weights.double(), None if b is None else b.double())
    assert got.shape == (M, N) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * K ** 0.5 * 4)


# ---- segment_lora_add_ ---------------------------------------------------------------------------------------------

def reference(y, x, factors, groups):
    """y + the per-token loop of the reference semantics, in float64."""
    out = y.double().clone()
    for i, g in enumerate(groups.tolist()):
        if g >= 0:
            f = factors[g]
            out[i] += (x[i].double() @ f.A.double().T) @ f.B.double().T
    return out


# (tokens, in, out, ranks per group): ranks of 0, one group, widths not a multiple of 8
SEGMENT_CASES = [(8, 64, 48, [8, 4, 0, 12]), (1, 16, 16, [3]), (5, 37, 21, [1, 2, 3]), (40, 24, 56, [6, 6]),
                 (8, 576, 960, [8, 5, 7, 8, 2, 8, 3, 8])]


def add(y, x, A, BT, offsets, groups):
    """One part's segment_lora_add_, its segments built for this call."""
    native.segment_lora_add_(y, x, native.segments(groups, [(A, BT, offsets, 0)]))


def segment_case(tokens, in_f, out_f, ranks, seed=0):
    gen = torch.Generator().manual_seed(seed)
    factors = [Factors(torch.randn(r, in_f, generator=gen), torch.randn(out_f, r, generator=gen)) for r in ranks]
    groups = torch.randint(-1, len(ranks), (tokens,), generator=gen)  # -1: the base model alone
    return factors, groups, torch.randn(tokens, in_f, generator=gen)


@needs_native
@pytest.mark.parametrize("tokens,in_f,out_f,ranks", SEGMENT_CASES)
def test_segment_kernel_adds_each_tokens_own_delta(tokens, in_f, out_f, ranks):
    factors, groups, x = segment_case(tokens, in_f, out_f, ranks)
    wide = torch.randn(tokens, out_f + 10)
    y = wide[:, 3: 3 + out_f]  # a column slice of a wider output, as the fused projections pass
    before, want = wide.clone(), reference(y, x, factors, groups)
    plan = SegmentPlan(Routing(groups, len(factors)), factors)
    assert plan.native
    plan.add_to(y, x)
    torch.testing.assert_close(y.double(), want, rtol=0, atol=1e-4 * in_f ** 0.5)
    assert torch.equal(wide[:, :3], before[:, :3]) and torch.equal(wide[:, 3 + out_f:], before[:, 3 + out_f:])


# (widths of the parts, their ranks per group, factor dtype): one part and three (a fused q/k/v), float32 and
# bfloat16 factors, widths not a multiple of 8
PARTS_CASES = [([48], [8, 0, 5], torch.float32), ([576, 192, 192], [8, 5, 12], torch.float32),
               ([20, 13, 7], [3, 1, 0, 9], torch.bfloat16), ([960], [8, 5, 7, 8], torch.bfloat16)]


@needs_native
@pytest.mark.parametrize("widths,ranks,dtype", PARTS_CASES)
def test_segment_kernel_adds_each_parts_delta_into_its_columns(widths, ranks, dtype):
    """Several parts over one x and one groups in one call, each into its own columns of y, equal the reference
    over the factors' values (bfloat16 widened exactly, float32 arithmetic); columns past the parts unchanged."""
    tokens, in_f = 9, 40
    gen = torch.Generator().manual_seed(len(widths))
    groups = torch.randint(-1, len(ranks), (tokens,), generator=gen)
    x = torch.randn(tokens, in_f, generator=gen)
    y = torch.randn(tokens, sum(widths) + 5, generator=gen)
    want, parts, column = y.double().clone(), [], 0
    for width in widths:
        factors = [Factors(torch.randn(r, in_f, generator=gen).to(dtype), torch.randn(width, r, generator=gen).to(dtype))
                   for r in ranks]
        plan = SegmentPlan(Routing(groups, len(factors)), [Factors(f.A.float(), f.B.float()) for f in factors])
        parts.append((plan.A.to(dtype), plan.BT.to(dtype), plan.offsets, column))
        want[:, column: column + width] = reference(y[:, column: column + width], x, factors, groups)
        column += width
    native.segment_lora_add_(y, x, native.segments(groups, parts))
    torch.testing.assert_close(y.double(), want, rtol=0, atol=1e-4 * in_f ** 0.5)


# groups of neighbouring tokens, which the kernel adds run by run (up to 8 tokens a run, each group's factors read
# once a run): runs of 1 to 11 tokens (11 = 8 + 3), a rank-0 group's run, base tokens between, and a decode step's
# batch of one adapter. Ranks 5, 3, 0, 9, 6, 8: every r % 4 and a multiple of 4 (each tail of the 4-row blocks).
RUN_CASES = [[0] * 11 + [4] * 5 + [-1] * 2 + [3] * 7 + [0] + [2] * 4 + [1] * 3 + [5] * 2 + [0] * 6 + [5] * 8,
             [1] * 8, [3] * 4 + [5] * 4, [0, 0, -1, 0, 0, 1, 1, 3]]


@needs_native
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("groups", RUN_CASES, ids=["runs-1-to-11", "one-adapter", "two-runs", "split-runs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_kernel_adds_runs_of_one_group_as_the_reference(groups, dtype, threads):
    """Runs of neighbouring tokens of one group (a prefill's prompt, a decode batch of one adapter) equal the
    reference token by token, in every part; `in`, widths and ranks off multiples of 8 and 4 (every tail); y a
    column slice of a wider output (the rows `ldy` apart), its other columns untouched; on 3 threads, runs cut
    where the threads split the tokens."""
    in_f, widths, ranks = 37, [20, 13, 7], [5, 3, 0, 9, 6, 8]
    gen = torch.Generator().manual_seed(len(groups))
    groups = torch.tensor(groups)
    x = torch.randn(len(groups), in_f, generator=gen)
    wide = torch.randn(len(groups), sum(widths) + 9, generator=gen)
    y = wide[:, 4: 4 + sum(widths)]
    before = wide.clone()
    want, parts, column = y.double().clone(), [], 0
    for width in widths:
        factors = [Factors(torch.randn(r, in_f, generator=gen).to(dtype), torch.randn(width, r, generator=gen).to(dtype))
                   for r in ranks]
        parts.append((torch.cat([f.A for f in factors]), torch.cat([f.B.T for f in factors]).contiguous(),
                      torch.tensor([0] + ranks).cumsum(0), column))
        want[:, column: column + width] = reference(y[:, column: column + width], x, factors, groups)
        column += width
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        native.segment_lora_add_(y, x, native.segments(groups, parts))
    finally:
        torch.set_num_threads(saved)
    torch.testing.assert_close(y.double(), want, rtol=0, atol=1e-4 * in_f ** 0.5)
    assert torch.equal(wide[:, :4], before[:, :4]) and torch.equal(wide[:, 4 + sum(widths):], before[:, 4 + sum(widths):])


@needs_native
@pytest.mark.parametrize("kernel", ["skinny_linear", "bf16_linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_kernels_add_their_lora_in_the_same_call(kernel, dtype):
    """A linear kernel given segments returns its own output plus their deltas (each part into its columns):
    equal to the kernel alone followed by segment_lora_add_."""
    tokens, in_f, widths = 8, 64, [40, 24, 32]
    gen = torch.Generator().manual_seed(7)
    x, w = torch.randn(tokens, in_f, generator=gen), torch.randn(sum(widths), in_f, generator=gen)
    b = torch.randn(sum(widths), generator=gen)
    groups = torch.tensor([0, 1, 2, -1, 2, 1, 0, 0])
    parts, column = [], 0
    for width in widths:
        ranks = torch.tensor([0, 5, 0, 4])  # group 1 has rank 0
        parts.append((torch.randn(9, in_f, generator=gen).to(dtype), torch.randn(9, width, generator=gen).to(dtype),
                      ranks.cumsum(0), column))
        column += width
    lora = native.segments(groups, parts)
    alone, _ = run_kernel(kernel, x, w, b)
    native.segment_lora_add_(alone, x, lora)
    if kernel == "skinny_linear":
        got = native.skinny_linear(x, w, b, lora)
    else:
        got = native.bf16_linear(x, w.bfloat16(), b, lora)
    torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)
    assert not torch.equal(got, run_kernel(kernel, x, w, b)[0])  # the deltas are there


@needs_native
@pytest.mark.parametrize("call,message", [
    (lambda lora: native.skinny_linear(torch.randn(3, 5), torch.randn(6, 5), None, lora), r"\(2, 5\) tensor"),
    (lambda lora: native.bf16_linear(torch.randn(2, 5), torch.randn(3, 5).bfloat16(), None, lora),
     "columns end at 6, past y's 3"),
    (lambda lora: native.segment_lora_add_(torch.zeros(2, 6), torch.randn(2, 4), lora), r"\(2, 5\) tensor"),
    (lambda lora: native.segment_lora_add_(torch.zeros(2, 6), torch.randn(2, 5).double(), lora), "x must be a float32"),
], ids=["tokens", "columns", "in", "dtype"])
def test_segments_refuse_inputs_they_do_not_fit(call, message):
    lora = native.segments(torch.tensor([0, 1]), [(torch.randn(8, 5), torch.randn(8, 6), torch.tensor([0, 4, 8]), 0)])
    with pytest.raises(RuntimeError, match=message):
        call(lora)


@needs_native
@pytest.mark.parametrize("make,message", [
    (lambda A, BT: (A.double(), BT.double()), "both float32 or both bfloat16"),
    (lambda A, BT: (A, BT.bfloat16()), "both float32 or both bfloat16"),
], ids=["float64", "mixed"])
def test_segment_kernel_refuses_factors_of_other_dtypes(make, message):
    y = torch.zeros(2, 6)
    A, BT = make(torch.randn(8, 5), torch.randn(8, 6))
    with pytest.raises(RuntimeError, match=message):
        add(y, torch.randn(2, 5), A, BT, torch.tensor([0, 4, 8]), torch.tensor([0, 1]))
    assert torch.equal(y, torch.zeros(2, 6))


@needs_native
def test_segment_kernel_refuses_a_part_past_ys_columns():
    y = torch.zeros(2, 6)
    part = (torch.randn(8, 5), torch.randn(8, 4), torch.tensor([0, 4, 8]), 3)  # columns 3..7 of 6
    with pytest.raises(RuntimeError, match=r"columns end at 7, past y's 6"):
        native.segment_lora_add_(y, torch.randn(2, 5), native.segments(torch.tensor([0, 1]), [part]))
    assert torch.equal(y, torch.zeros(2, 6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_segment_plan_without_the_kernel_computes_the_same(dtype, monkeypatch):
    """Where the kernel does not run (another dtype or device, or no build) the plan's PyTorch path is the same
    semantics."""
    monkeypatch.setattr(native, "applies", lambda *tensors: False)
    factors, groups, x = segment_case(12, 24, 20, [4, 0, 7])
    factors = [Factors(f.A.to(dtype), f.B.to(dtype)) for f in factors]
    plan = SegmentPlan(Routing(groups, len(factors)), factors)
    assert not plan.native
    want = reference(torch.zeros(12, 20), x.to(dtype), factors, groups)
    tol = 5e-2 * 24 ** 0.5 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(plan(x.to(dtype)).double(), want, rtol=0, atol=tol)


@needs_native
@pytest.mark.parametrize("groups,parts,message", [
    (torch.tensor([0, 1]), [], "one entry per part, at least one"),
    (torch.tensor([0, 1]), [(torch.randn(8, 5), torch.randn(8, 6), torch.tensor([0, 4, 8]), 0),
                            (torch.randn(8, 4), torch.randn(8, 6), torch.tensor([0, 4, 8]), 6)], "one in for every part"),
    (torch.tensor([0, 1]), [(torch.randn(8, 5), torch.randn(8, 6), torch.tensor([0, 4, 8]), -1)], "is negative"),
    (torch.tensor([0, 1]), [(torch.randn(8, 5), torch.randn(6, 8).T, torch.tensor([0, 4, 8]), 0)],
     r"BT must be a contiguous \(R, out\)"),
    (torch.tensor([[0, 1]]), [(torch.randn(8, 5), torch.randn(8, 6), torch.tensor([0, 4, 8]), 0)],
     r"groups must be a contiguous \(N,\) long"),
], ids=["no-parts", "two-ins", "negative-column", "strided-BT", "2-D-groups"])
def test_segments_refuse_what_the_kernel_cannot_read(groups, parts, message):
    with pytest.raises(RuntimeError, match=message):
        native.segments(groups, parts)


@needs_native
def test_segments_hold_their_own_copy_of_the_routing():
    """Editing the groups or offsets passed in, after the segments were checked, changes nothing they compute (a
    group past the factors would otherwise be read unchecked)."""
    groups, offsets = torch.tensor([0, 1]), torch.tensor([0, 4, 8])
    A, BT, x = torch.randn(8, 5), torch.randn(8, 6), torch.randn(2, 5)
    lora = native.segments(groups, [(A, BT, offsets, 0)])
    want = torch.zeros(2, 6)
    native.segment_lora_add_(want, x, lora)
    groups[0], offsets[1] = 99, 50
    got = torch.zeros(2, 6)
    native.segment_lora_add_(got, x, lora)
    assert torch.equal(got, want)


def test_a_kernel_call_where_they_do_not_run_says_why(monkeypatch):
    monkeypatch.setattr(native, "_kernels", native._Unbuilt())
    monkeypatch.setattr(native, "unavailable", lambda: "ADALORA_NATIVE=0")
    with pytest.raises(RuntimeError, match="the native CPU kernels do not run here: ADALORA_NATIVE=0"):
        native.rms_norm(torch.randn(2, 4), torch.ones(4), 1e-5)


@needs_native
@pytest.mark.parametrize("offsets,groups,message", [
    ([0, 4, 2], [0, 1], "offsets must rise within"),
    ([0, 4, 9], [0, 1], "offsets must rise within"),  # past R = 8 rows
    ([0, 4, 8], [0, 2], "group 2 of token 1 >= G = 2"),
], ids=["falling", "past-R", "group"])
def test_segment_kernel_refuses_bad_indices(offsets, groups, message):
    """Indices that would read outside the factors are refused before any read."""
    y, x = torch.zeros(2, 6), torch.randn(2, 5)
    with pytest.raises(RuntimeError, match=message):
        add(y, x, torch.randn(8, 5), torch.randn(8, 6), torch.tensor(offsets), torch.tensor(groups))
    assert torch.equal(y, torch.zeros(2, 6))


@needs_native
def test_segment_kernel_refuses_rows_of_y_that_share_memory():
    """An expanded y (every row the same memory) would race between threads: refused."""
    y = torch.zeros(1, 6).expand(2, 6)
    with pytest.raises(RuntimeError, match="internal overlap|single memory location"):
        add(y, torch.randn(2, 5), torch.randn(8, 5), torch.randn(8, 6), torch.tensor([0, 4, 8]), torch.tensor([0, 1]))


@needs_native
def test_segment_kernel_refuses_a_y_with_strided_columns():
    y = torch.zeros(6, 2).T  # (2, 6) with column stride 2
    with pytest.raises(RuntimeError, match="unit column stride"):
        add(y, torch.randn(2, 5), torch.randn(8, 5), torch.randn(8, 6), torch.tensor([0, 4, 8]), torch.tensor([0, 1]))


# ---- rms_norm, rope_ ------------------------------------------------------------------------------------------------

# (rows, hidden): H % 8 (the scalar tail), one row, more rows than one thread's grain, SmolLM2's width, no rows
NORM_CASES = [(1, 8), (3, 13), (8, 576), (40, 64), (2, 1), (0, 16)]


@needs_native
@pytest.mark.parametrize("M,H", NORM_CASES)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided-rows"])
def test_rms_norm_equals_transformers_llama_rmsnorm(M, H, strided):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(M * 100 + H)
    module = LlamaRMSNorm(H, eps=1e-5)
    module.weight.data = torch.randn(H, generator=gen)
    x = torch.randn(M, 2 * H, generator=gen) * 3
    x = x[:, :H] if strided else x[:, :H].contiguous()
    with torch.no_grad():
        want = module(x.double().float()).double()
    got = native.rms_norm(x, module.weight.detach(), 1e-5)
    assert got.shape == (M, H) and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


# (tokens, heads, head_dim): SmolLM2's q + k heads, odd head counts, the smallest even head_dim
ROPE_CASES = [(1, 12, 64), (5, 3, 8), (20, 2, 2), (0, 4, 8)]


@needs_native
@pytest.mark.parametrize("T,heads,D", ROPE_CASES)
def test_rope_equals_transformers_apply_rotary_pos_emb(T, heads, D):
    """In place over q and k heads that are a column slice of a wider row (the fused q/k/v output)."""
    from transformers.models.llama.modeling_llama import rotate_half

    gen = torch.Generator().manual_seed(T * 10 + D)
    qkv = torch.randn(T, heads * D + 7, generator=gen)
    angles = torch.randn(T, D // 2, generator=gen).repeat(1, 2)
    cos, sin = angles.cos(), angles.sin()
    x = qkv[:, : heads * D].reshape(T, heads, D).double()
    want = x * cos.double()[:, None] + rotate_half(x) * sin.double()[:, None]
    tail = qkv[:, heads * D:].clone()
    native.rope_(qkv[:, : heads * D], cos, sin, D)
    torch.testing.assert_close(qkv[:, : heads * D].reshape(T, heads, D).double(), want, rtol=0, atol=1e-5)
    assert torch.equal(qkv[:, heads * D:], tail)  # the columns past the heads are untouched


@needs_native
@pytest.mark.parametrize("call,message", [
    (lambda: native.rms_norm(torch.randn(2, 4, dtype=torch.float64), torch.ones(4), 1e-5), "x must be a float32"),
    (lambda: native.rms_norm(torch.randn(2, 4), torch.ones(5), 1e-5), r"w must be a contiguous \(H,\)"),
    (lambda: native.rms_norm(torch.randn(4, 2).T, torch.ones(4), 1e-5), "unit column stride"),
    (lambda: native.rope_(torch.randn(2, 8), torch.randn(2, 3), torch.randn(2, 3), 3), "head_dim must be even"),
    (lambda: native.rope_(torch.randn(2, 10), torch.randn(2, 4), torch.randn(2, 4), 4), r"heads \* head_dim"),
    (lambda: native.rope_(torch.randn(2, 8), torch.randn(3, 4), torch.randn(3, 4), 4), r"contiguous \(T, head_dim\)"),
    (lambda: native.rope_(torch.zeros(1, 8).expand(2, 8), torch.randn(2, 4), torch.randn(2, 4), 4),
     "internal overlap|single memory location"),
], ids=["norm-dtype", "norm-weight", "norm-strided-columns", "rope-odd-dim", "rope-width", "rope-cos", "rope-overlap"])
def test_norm_and_rope_refuse_what_they_cannot_compute(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


# ---- silu_mul ---------------------------------------------------------------------------------------------------------

@needs_native
@pytest.mark.parametrize("M,I", [(1, 8), (3, 13), (8, 1536), (40, 64), (0, 16)])
def test_silu_mul_equals_the_models_silu_times_up(M, I):
    """silu(gate) * up from [gate | up] rows (a strided view, as a wider output's columns), within a few ulp of
    transformers' SiLU (exp is a polynomial here), including gates far out in both tails."""
    gen = torch.Generator().manual_seed(M * 100 + I)
    x = torch.randn(M, 2 * I + 3, generator=gen) * 4
    if M:  # both tails of exp's clamp (-88.5: just past where 2^n would overflow), and zero
        x[0, :4] = torch.tensor([-100.0, -88.5, 90.0, 0.0])
    x = x[:, : 2 * I]
    want = torch.nn.SiLU()(x[:, :I]) * x[:, I:]
    got = native.silu_mul(x, I)
    assert got.shape == (M, I) and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=4e-7, atol=1e-30)


@needs_native
def test_silu_mul_refuses_a_row_that_is_not_gate_and_up():
    with pytest.raises(RuntimeError, match=r"x must be \(M, 2 \* I\)"):
        native.silu_mul(torch.randn(2, 10), 4)


# ---- decode_attention ------------------------------------------------------------------------------------------------

# (rows, heads, kv heads, head_dim, cache width, each row's length): grouped-query and plain heads, D % 8 tails,
# a row at the full width, a one-token row
ATTENTION_CASES = [(2, 9, 3, 64, 12, [12, 5]), (3, 4, 4, 8, 6, [1, 6, 3]), (1, 6, 2, 13, 4, [4]),
                   (8, 2, 1, 16, 40, [1, 2, 3, 10, 20, 33, 39, 40])]


@needs_native
@pytest.mark.parametrize("B,H,Hkv,D,W,lengths", ATTENTION_CASES)
def test_decode_attention_equals_sdpa_over_each_rows_own_keys(B, H, Hkv, D, W, lengths):
    """Keys and values are a strided window of a wider cache, as the lean path passes them."""
    gen = torch.Generator().manual_seed(B * 7 + D)
    cache_k, cache_v = torch.randn(2, B + 1, Hkv, W + 5, D, generator=gen), torch.randn(2, B + 1, Hkv, W + 5, D, generator=gen)
    keys, values = cache_k[1, :B, :, :W], cache_v[1, :B, :, :W]
    q = torch.randn(B, 1, H, D, generator=gen).transpose(1, 2)[:, :, 0]  # (B, H, D), strided
    scale = D ** -0.5
    got = native.decode_attention(q, keys, values, torch.tensor(lengths), scale)
    assert got.shape == (B, H, D)
    for b, n in enumerate(lengths):
        want = F.scaled_dot_product_attention(q[b, :, None].double(), keys[b, :, :n].double(), values[b, :, :n].double(),
                                              scale=scale, enable_gqa=H != Hkv)[:, 0]
        torch.testing.assert_close(got[b].double(), want, rtol=0, atol=1e-5)


@needs_native
@pytest.mark.parametrize("B,H,Hkv,D,W,lengths", [(3, 4, 2, 8, 6, [1, 6, 3]), (2, 9, 3, 64, 40, [17, 40])])
def test_decode_attention_writes_the_new_tokens_then_attends(B, H, Hkv, D, W, lengths):
    """Given the step's new keys and values, each row's land in its column lengths[b] - 1 of the layer's cache rows
    (more rows than B, nothing else written) and the attention includes them: the cache write, then the same
    attention as without them."""
    gen = torch.Generator().manual_seed(B * 11 + D)
    cache_k, cache_v = torch.randn(2, B + 2, Hkv, W, D, generator=gen), torch.randn(2, B + 2, Hkv, W, D, generator=gen)
    new_k = torch.randn(B, 1, Hkv, D, generator=gen).transpose(1, 2)[:, :, 0]  # (B, Hkv, D), strided as the lean path's
    new_v = torch.randn(B, 1, Hkv, D, generator=gen).transpose(1, 2)[:, :, 0]
    q = torch.randn(B, H, D, generator=gen)
    want_k, want_v = cache_k.clone(), cache_v.clone()
    for b, n in enumerate(lengths):
        want_k[1, b, :, n - 1], want_v[1, b, :, n - 1] = new_k[b], new_v[b]
    want = native.decode_attention(q, want_k[1], want_v[1], torch.tensor(lengths), D ** -0.5)
    got = native.decode_attention(q, cache_k[1], cache_v[1], torch.tensor(lengths), D ** -0.5, new_k, new_v)
    assert torch.equal(cache_k, want_k) and torch.equal(cache_v, want_v)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_native
@pytest.mark.parametrize("new_k,new_v,message", [
    ((2, 2, 8), None, "give both new_keys and new_values, or neither"),
    ((2, 1, 8), (2, 1, 8), r"new_keys and new_values must be \(2, 2, 8\)"),
], ids=["one-of-two", "shape"])
def test_decode_attention_refuses_new_tokens_that_do_not_fit(new_k, new_v, message):
    keys, values = torch.zeros(2, 2, 5, 8), torch.zeros(2, 2, 5, 8)
    with pytest.raises(RuntimeError, match=message):
        native.decode_attention(torch.randn(2, 4, 8), keys, values, torch.tensor([1, 2]), 0.1, torch.randn(*new_k),
                                None if new_v is None else torch.randn(*new_v))
    assert not keys.any() and not values.any()  # nothing written


@needs_native
def test_decode_attention_refuses_to_write_a_cache_whose_rows_share_memory():
    keys = torch.zeros(1, 2, 5, 8).expand(2, 2, 5, 8)  # both rows the same memory: two writes to one place
    with pytest.raises(RuntimeError, match="internal overlap|single memory location"):
        native.decode_attention(torch.randn(2, 4, 8), keys, torch.zeros(2, 2, 5, 8), torch.tensor([1, 2]), 0.1,
                                torch.randn(2, 2, 8), torch.randn(2, 2, 8))


@needs_native
@pytest.mark.parametrize("q,kv,lengths,message", [
    ((2, 4, 8), (2, 2, 5, 8), [6, 1], r"length 6 of row 0 is outside \[1, 5\]"),
    ((2, 4, 8), (2, 2, 5, 8), [0, 1], r"length 0 of row 0 is outside"),
    ((2, 3, 8), (2, 2, 5, 8), [1, 1], "heads a multiple of kv heads"),
    ((2, 4, 8), (2, 2, 5, 8), [1], r"lengths must be a contiguous \(B,\)"),
], ids=["past-width", "empty-row", "heads", "lengths"])
def test_decode_attention_refuses_what_it_cannot_compute(q, kv, lengths, message):
    with pytest.raises(RuntimeError, match=message):
        native.decode_attention(torch.randn(*q), torch.randn(*kv), torch.randn(*kv), torch.tensor(lengths), 0.1)


# ---- the loader ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("env,message", [
    ({"ADALORA_NATIVE": "0"}, "ADALORA_NATIVE=0"),
    ({"CXX": "/nonexistent/c++"}, r"no C\+\+ compiler \(/nonexistent/c\+\+\) on PATH"),
])
def test_loader_says_why_the_kernels_cannot_run(env, message, monkeypatch):
    monkeypatch.delenv("ADALORA_NATIVE", raising=False)
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")  # the same answer on any host
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    reason = native.unavailable.__wrapped__()  # uncached: the process's own answer stays as it was
    assert reason is not None and __import__("re").search(message, reason)


def test_loader_turns_a_failed_build_into_a_reason(monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.delenv("ADALORA_NATIVE", raising=False)
    def fail(**kwargs):
        raise RuntimeError("Error building extension 'adalora_native'\nnative.cpp:1: error: something")

    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(native.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(cpp_extension, "load", fail)
    assert native.unavailable.__wrapped__() == "building native.cpp failed: native.cpp:1: error: something"


def test_loader_refuses_a_cpu_without_avx2(monkeypatch):
    monkeypatch.delenv("ADALORA_NATIVE", raising=False)
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert native.unavailable.__wrapped__() == "the CPU lacks AVX2 + FMA (torch reports DEFAULT)"
