"""SVD-form layer math against a naive dense reference; compact export equals the masked full adapter."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adalora import AdaLoraConfig, RankAllocator, SVDLinear, apply_delta, delta_weight, inject_adapters
from adalora.inject import attach_adapter
from adalora.regularizer import orth_penalty
from tests.conftest import tiny_bert, tiny_llama


def naive_delta(P, lam, Q, scale):
    out = torch.zeros(P.shape[0], Q.shape[1], dtype=torch.float64)
    for i in range(lam.shape[0]):
        out += lam[i].double() * torch.outer(P[:, i].double(), Q[i].double())
    return out * scale


@pytest.mark.parametrize("out_f,in_f,r", [(5, 7, 3), (16, 8, 1), (4, 4, 4), (6, 3, 0)])
def test_delta_formula_matches_naive_sum_of_rank_ones(out_f, in_f, r):
    gen = torch.Generator().manual_seed(0)
    P, lam, Q = torch.randn(out_f, r, generator=gen), torch.randn(r, generator=gen), torch.randn(r, in_f, generator=gen)
    torch.testing.assert_close(delta_weight(P, lam, Q, 0.7).double(), naive_delta(P, lam, Q, 0.7), atol=1e-5, rtol=0)
    x = torch.randn(2, 3, in_f, generator=gen)
    torch.testing.assert_close(apply_delta(x, P, lam, Q, 0.7), x @ delta_weight(P, lam, Q, 0.7).T, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_svd_linear_forward_equals_base_plus_delta(kind):
    torch.manual_seed(0)
    base = nn.Linear(8, 6) if kind == "linear" else Conv1D(6, 8)
    layer = SVDLinear(base, rank=3, scale=2.0)
    with torch.no_grad():
        for p in (layer.P, layer.lam, layer.Q):
            p.normal_()
    x = torch.randn(4, 8)
    weight = base.weight if kind == "linear" else base.weight.T  # Conv1D stores (in, out)
    expected = x @ (weight + delta_weight(layer.P, layer.lam, layer.Q, 2.0)).T + base.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["orthogonal", "peft"])
def test_initial_adapter_is_a_no_op(init):
    model = tiny_llama()
    x = torch.randint(0, 64, (2, 5))
    ref = model(input_ids=x).logits
    inject_adapters(model, AdaLoraConfig(init_r=4, target_r=2, total_step=10, init=init))
    torch.testing.assert_close(model(input_ids=x).logits, ref, atol=1e-6, rtol=0)


def test_orthogonal_init_has_zero_regularizer_and_lora_mode_has_unit_lambda():
    model = tiny_llama()
    adapters = inject_adapters(model, AdaLoraConfig(init_r=4, target_r=2, total_step=10))
    assert float(orth_penalty(adapters).detach()) < 1e-5
    lora = inject_adapters(tiny_llama(), AdaLoraConfig(mode="lora", init_r=4))
    for layer in lora.layers.values():
        assert torch.equal(layer.lam, torch.ones(4)) and not layer.lam.requires_grad
        assert torch.count_nonzero(layer.P) == 0


def naive_orth(adapters):
    terms = []
    for layer in adapters.layers.values():
        r = layer.rank
        terms.append(torch.sqrt(((layer.P.T @ layer.P - torch.eye(r)) ** 2).sum()))
        terms.append(torch.sqrt(((layer.Q @ layer.Q.T - torch.eye(r)) ** 2).sum()))
    return sum(terms) / len(terms)


def test_orth_penalty_matches_reference():
    adapters = inject_adapters(tiny_llama(), AdaLoraConfig(init_r=3, target_r=2, total_step=10, init="peft"))
    torch.testing.assert_close(orth_penalty(adapters), naive_orth(adapters))


def _randomize(adapters, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapters.layers.values():
            for p in (layer.P, layer.lam, layer.Q):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.mark.parametrize("make,task", [(tiny_llama, "causal-lm"), (tiny_bert, "seq-cls")])
def test_compact_adapter_forward_equals_masked_full_adapter(make, task):
    model = make()
    labels = ["a", "b", "c"] if task == "seq-cls" else None
    adapters = inject_adapters(model, AdaLoraConfig(init_r=4, target_r=2, total_step=10), task_type=task, labels=labels)
    _randomize(adapters)
    gen = torch.Generator().manual_seed(1)
    masks = {p: torch.rand(4, generator=gen) > 0.5 for p in adapters.layers}
    first = next(iter(masks))
    masks[first] = torch.zeros(4, dtype=torch.bool)  # a layer that keeps nothing
    with torch.no_grad():
        for path, layer in adapters.layers.items():
            layer.lam.masked_fill_(~masks[path], 0.0)
    x = torch.randint(0, 64, (2, 6))
    ref = model(input_ids=x).logits
    compact = adapters.export(masks)
    assert first not in compact.layers and compact.ranks()[first] == 0
    assert compact.num_params() == sum(int(m.sum()) * (l.in_features + l.out_features + 1)
                                       for m, l in zip(masks.values(), adapters.layers.values()))
    fresh = make()
    attach_adapter(fresh, compact)
    torch.testing.assert_close(fresh(input_ids=x).logits, ref, atol=1e-5, rtol=0)


def test_allocator_masks_export_to_the_reached_budget():
    model = tiny_llama()
    adapters = inject_adapters(model, AdaLoraConfig(init_r=4, target_r=2, tinit=0, tfinal=2, deltaT=1, total_step=8))
    allocator = RankAllocator(adapters)
    opt = torch.optim.AdamW(adapters.trainable_parameters(), lr=1e-2)
    x = torch.randint(0, 64, (2, 6))
    for step in range(8):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        allocator.step(step)
        opt.zero_grad()
    compact = adapters.export(allocator.masks)
    assert sum(compact.ranks().values()) == allocator.reached()["triplets"] == allocator.target_budget


def test_the_package_docstring_example_runs(tmp_path):
    """The training loop in adalora's docstring, run as written on a tiny Llama (it once called export(allocator))."""
    import adalora
    from adalora import load_adapter

    example = adalora.__doc__.split("::", 1)[1]
    code = "\n".join(line[4:] for line in example.strip("\n").splitlines())
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    namespace = {**{name: getattr(adalora, name) for name in adalora.__all__}, "torch": torch, "model": model,
                 "batch": {"input_ids": ids, "labels": ids}, "total_step": 12, "out": tmp_path / "out"}
    exec(compile(code, "adalora.__doc__", "exec"), namespace)
    adapter = load_adapter(tmp_path / "out")
    assert adapter.shapes and sum(adapter.ranks().values()) > 0
