"""Merge methods against naive dense references on tiny random models, and the failure cases (nothing written)."""

import copy
import dataclasses
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from adalora.adapter_file import load_adapter, read_manifest, save_adapter
from adalora.config import ConfigError
from adalora.inject import attach_adapter
from tests.conftest import tiny_bert, tiny_llama
from tests.factories import random_adapter
from adalora.tools.merge import MergeError, MergeParams, merge_adapters, merge_files, merge_into_base, tallqr
from adalora.tools.merge.dense import layer_generator
from adalora.tools.merge.into_base import MERGE_RECORD

@pytest.fixture(scope="module")
def inputs():
    """Three llama adapters differing in init_r, lora_alpha (scale), ranks and adapted modules."""
    base = tiny_llama()
    return [random_adapter(base, 1, init_r=4, lora_alpha=8.0),
            random_adapter(base, 2, init_r=6, lora_alpha=3.0, targets=("q_proj", "v_proj", "down_proj")),
            random_adapter(base, 3, init_r=3, lora_alpha=3.0, targets=("k_proj", "q_proj", "up_proj"))]


WEIGHTS = (0.7, -0.3, 1.2)


def dense_sum(adapters, weights, path):
    """Naive reference: sum_i w_i * dense delta_i (zero where an input does not adapt the module)."""
    total = None
    for a, w in zip(adapters, weights):
        if path in a.shapes:
            d = w * a.delta(path)
            total = d if total is None else total + d
    return total


def logits(model, adapter=None):
    model = copy.deepcopy(model)
    if adapter is not None:
        attach_adapter(model, adapter)
    ids = torch.arange(12).view(2, 6) % 60 + 3
    with torch.no_grad():
        return model(input_ids=ids).logits


def close(a, b, tol=1e-4):
    return float((a - b).norm()) <= tol * max(1.0, float(b.norm()))


ONE_INPUT_CASES = [
    ("linear", {}),
    ("task_arithmetic", {"lambda_": 1.0}),
    ("svd", {}),
    ("decorrelate", {}),
    ("ties", {"density": 1.0}),
    ("dare_linear", {"density": 1.0, "seed": 3}),
    ("dare_ties", {"density": 1.0}),
    ("magnitude_prune", {"density": 1.0}),
]


@pytest.mark.parametrize("method,extra", ONE_INPUT_CASES)
def test_one_adapter_with_weight_one_reproduces_it(inputs, method, extra):
    base = tiny_llama()
    merged = merge_adapters([inputs[0]], method, MergeParams(weights=(1.0,), **extra))
    assert merged.scale == 1.0
    assert close(logits(base, merged), logits(base, inputs[0]), 1e-5)


def test_linear_equals_sum_of_dense_deltas(inputs):
    merged = merge_adapters(inputs, "linear", MergeParams(weights=WEIGHTS))
    assert set(merged.shapes) == set().union(*(a.shapes for a in inputs))
    for path in merged.shapes:
        assert close(merged.delta(path), dense_sum(inputs, WEIGHTS, path), 1e-6)
        assert merged.ranks()[path] == sum(a.ranks().get(path, 0) for a in inputs)


def test_task_arithmetic_lambda_scales_the_sum(inputs):
    merged = merge_adapters(inputs, "task_arithmetic", MergeParams(weights=WEIGHTS, lambda_=0.4))
    for path in merged.shapes:
        assert close(merged.delta(path), 0.4 * dense_sum(inputs, WEIGHTS, path), 1e-6)


def assert_adalora_shaped(adapter):
    for layer in adapter.layers.values():
        eye = torch.eye(layer.rank)
        assert torch.allclose(layer.P.T @ layer.P, eye, atol=1e-5)
        assert torch.allclose(layer.Q @ layer.Q.T, eye, atol=1e-5)
        assert (layer.lam[:-1] >= layer.lam[1:]).all() and (layer.lam > 0).all()


@pytest.fixture(params=["one-block", "tiny-blocks"])
def qr_blocks(request, monkeypatch):
    """The svd merge's row-block QR as configured (one block at these sizes), and cut into 5-row blocks."""
    if request.param == "tiny-blocks":
        monkeypatch.setattr(tallqr, "ROW_BLOCK", 5)
        monkeypatch.setattr(tallqr, "BLOCK_WIDTHS", 0)
    return request.param


def test_svd_full_budget_is_the_exact_sum(inputs, qr_blocks):
    exact = merge_adapters(inputs, "svd", MergeParams(weights=WEIGHTS))
    full_budget = sum(r * (i + o + 1) for p, (i, o) in exact.shapes.items() for r in [exact.ranks()[p]])
    for merged in (exact, merge_adapters(inputs, "svd", MergeParams(weights=WEIGHTS, budget=full_budget))):
        assert_adalora_shaped(merged)
        for path in merged.shapes:
            assert close(merged.delta(path), dense_sum(inputs, WEIGHTS, path), 1e-5)
            in_f, out_f = merged.shapes[path]
            assert merged.ranks()[path] == min(in_f, out_f, sum(a.ranks().get(path, 0) for a in inputs))


@pytest.mark.parametrize("fraction", [0.5, 0.2])
def test_svd_budget_error_is_the_eckart_young_optimum(inputs, fraction, qr_blocks):
    exact = merge_adapters(inputs, "svd", MergeParams(weights=WEIGHTS))
    budget = int(fraction * exact.num_params())
    merged = merge_adapters(inputs, "svd", MergeParams(weights=WEIGHTS, budget=budget))
    assert_adalora_shaped(merged)
    assert merged.num_params() <= budget
    kept, dropped, err2, opt2 = [], [], 0.0, 0.0
    for path in merged.shapes:
        dense = dense_sum(inputs, WEIGHTS, path)
        s = torch.linalg.svd(dense.double()).S  # naive: full SVD of the dense sum
        s = s[s > 1e-5 * s.max()]
        r = merged.ranks()[path]
        kept += s[:r].tolist()
        dropped += s[r:].tolist()
        err2 += float((merged.delta(path).double() - dense.double()).norm() ** 2)
        opt2 += float((s[r:] ** 2).sum())
    assert math.sqrt(err2) == pytest.approx(math.sqrt(opt2), rel=1e-4, abs=1e-5)
    assert dropped and min(kept) >= max(dropped) - 1e-5  # the globally largest singular values are kept


def naive_keep_top(values, density):
    order = sorted(range(len(values)), key=lambda j: -abs(values[j]))
    keep = set(order[:int(density * len(values))])
    return [v if j in keep else 0.0 for j, v in enumerate(values)]


def naive_elect(columns, method):
    """columns: per entry, the list of each input's (pruned) value."""
    signs = []
    for vals in columns:
        if method == "total":
            signs.append(1.0 if sum(vals) >= 0 else -1.0)
        else:
            signs.append(1.0 if sum((v > 0) - (v < 0) for v in vals) >= 0 else -1.0)
    return signs


def naive_disjoint(pruned, weights, method):
    out = []
    columns = list(zip(*pruned))
    for vals, sign in zip(columns, naive_elect(columns, method)):
        agree = [w * v for v, w in zip(vals, weights) if v != 0 and (v > 0) == (sign > 0)]
        out.append(sum(agree) / max(1, len(agree)))
    return out


def naive_dare(flat, shape, seed, path, density):
    gen = layer_generator(seed, path)  # the documented seeding contract: one generator per (seed, module)
    pruned = []
    for values in flat:
        draws = torch.rand(shape, generator=gen).flatten().tolist()
        pruned.append([v / density if u < density else 0.0 for v, u in zip(values, draws)])
    return pruned


def naive_method(method, flat, weights, density, majority, seed, path, shape):
    if method in ("ties", "magnitude_prune"):
        pruned = [naive_keep_top(values, density) for values in flat]
    else:
        pruned = naive_dare(flat, shape, seed, path, density)
    if method in ("ties", "dare_ties"):
        return naive_disjoint(pruned, weights, majority)
    return [sum(w * v for v, w in zip(vals, weights)) for vals in zip(*pruned)]


DENSE_CASES = [
    ("ties", 0.3, "total"), ("ties", 0.6, "frequency"), ("dare_linear", 0.5, None),
    ("dare_ties", 0.4, "total"), ("dare_ties", 0.7, "frequency"), ("magnitude_prune", 0.25, None),
]


@pytest.mark.parametrize("method,density,majority", DENSE_CASES)
def test_dense_methods_match_naive_reference(inputs, method, density, majority):
    seed = 11 if method.startswith("dare") else None
    params = MergeParams(weights=WEIGHTS, density=density, majority=majority, seed=seed, lambda_=0.8)
    merged = merge_adapters(inputs, method, params)
    assert_adalora_shaped(merged)
    for path in list(merged.shapes)[::3]:
        in_f, out_f = merged.shapes[path]
        flat = [(a.delta(path) if path in a.shapes else torch.zeros(out_f, in_f)).flatten().tolist() for a in inputs]
        ref = torch.tensor(naive_method(method, flat, WEIGHTS, density, majority, seed or 0, path, (out_f, in_f)))
        assert close(merged.delta(path), 0.8 * ref.view(out_f, in_f), 1e-5), path


def test_dare_is_deterministic_per_seed(inputs):
    def run(seed):
        m = merge_adapters(inputs, "dare_ties", MergeParams(weights=WEIGHTS, density=0.5, seed=seed))
        return torch.cat([m.delta(p).flatten() for p in m.shapes])
    assert torch.equal(run(5), run(5))
    assert not torch.allclose(run(5), run(6))


@pytest.mark.parametrize("method", ["ties", "dare_linear", "magnitude_prune"])
def test_dense_methods_keep_the_optimal_triplets_within_the_budget(inputs, method):
    """Each layer's spectrum is cut at what the whole budget could pay for before the global selection; the
    result still has the exact dense result's optimal truncation error (Eckart-Young, globally)."""
    params = MergeParams(weights=WEIGHTS, density=0.5)
    exact = merge_adapters(inputs, method, params)  # full rank: every nonzero triplet
    merged = merge_adapters(inputs, method, dataclasses.replace(params, budget=2000))
    assert 0 < merged.num_params() <= 2000
    assert_adalora_shaped(merged)
    err2, opt2 = 0.0, 0.0
    for path, layer in exact.layers.items():
        r = merged.ranks().get(path, 0)
        assert r <= 2000 // sum(exact.shapes[path]) + 1
        err2 += float((merged.delta(path).double() - exact.delta(path).double()).norm() ** 2)
        opt2 += float((layer.lam[r:].double() ** 2).sum())  # exact.lam: the singular values, descending
    assert math.sqrt(err2) == pytest.approx(math.sqrt(opt2), rel=1e-4, abs=1e-5)


def test_a_dense_method_written_to_a_file_defaults_to_the_inputs_summed_params(tmp_path, inputs):
    paths = [save_adapter(a, tmp_path / f"in{i}").parent for i, a in enumerate(inputs)]
    summed = sum(a.num_params() for a in inputs)
    written = merge_files(paths, tmp_path / "out", "ties", MergeParams(weights=WEIGHTS, density=0.5))
    got = load_adapter(written)
    assert got.info["merge"]["params"]["budget"] == summed and 0 < got.num_params() <= summed
    exact = merge_adapters(inputs, "ties", MergeParams(weights=WEIGHTS, density=0.5))  # in memory: exact rank
    assert exact.num_params() > summed


def test_merge_info_records_inputs_weights_method_params(inputs):
    merged = merge_adapters(inputs, "svd", MergeParams(weights=WEIGHTS, budget=3000))
    info = merged.info["merge"]
    assert info["method"] == "svd" and info["params"] == {"weights": list(WEIGHTS), "budget": 3000}
    assert len({e["sha256"] for e in info["inputs"]}) == 3


STREAMED = [("linear", {}), ("task_arithmetic", {"lambda_": 0.5}), ("svd", {"budget": 3000}), ("svd", {}),
            ("decorrelate", {}), ("isotropic", {"budget": 3000}), ("ties", {"density": 0.5, "budget": 4000})]


@pytest.mark.parametrize("method,extra", STREAMED, ids=[f"{m}-{sorted(e)}" for m, e in STREAMED])
def test_merge_files_writes_what_merge_adapters_returns(tmp_path, inputs, method, extra):
    """merge_files streams the result layer by layer: the file holds exactly the in-memory merge, manifest
    (provenance and sha256) included."""
    paths = [save_adapter(a, tmp_path / f"in{i}").parent for i, a in enumerate(inputs)]
    params = MergeParams(weights=WEIGHTS, **extra)
    written = merge_files(paths, tmp_path / "out", method, params)
    expected = merge_adapters([load_adapter(p) for p in paths], method, params, names=[str(p) for p in paths])
    for entry, path in zip(expected.info["merge"]["inputs"], paths):
        entry["path"] = str(path.resolve())
    assert read_manifest(written) == read_manifest(save_adapter(expected, tmp_path / "expected"))
    got = load_adapter(written)
    assert got.ranks() == expected.ranks()
    for path, layer in expected.layers.items():
        for name in ("P", "lam", "Q"):
            assert torch.equal(getattr(got.layers[path], name), getattr(layer, name)), (path, name)


# ----------------------------------------------------------------------------- failures: nothing written

def other_base(adapter):
    other = copy.deepcopy(adapter)
    other.base = {**other.base, "config_sha256": "0" * 64, "name": "other"}
    return other


def other_shape(adapter):
    other = copy.deepcopy(adapter)
    path = next(iter(other.shapes))
    other.shapes[path] = (7, 9)
    other.layers.pop(path, None)
    return other


FAILURES = [  # (method, params, transform of input 2, regex the message must match)
    ("linear", {"weights": (1.0,)}, None, "--weights has 1 value"),
    ("linear", {"weights": (1.0, float("inf"))}, None, "finite"),
    ("svd", {"weights": (1.0, 1.0)}, other_base, "same base model"),
    ("linear", {"weights": (1.0, 1.0)}, other_shape, r"\(in, out\)=\(7, 9\)"),
    ("mean", {"weights": (1.0, 1.0)}, None, "unknown merge method 'mean'"),
    ("ties", {"weights": (1.0, 1.0), "density": 1.5}, None, "--density 1.5"),
    ("ties", {"weights": (1.0, 1.0)}, None, "needs --density"),
    ("ties", {"weights": (1.0, 1.0), "density": 0.5, "majority": "most"}, None, "--majority"),
    ("linear", {"weights": (1.0, 1.0), "density": 0.5}, None, "does not use --density"),
    ("svd", {"weights": (1.0, 1.0), "budget": 0}, None, "--budget 0"),
]


@pytest.mark.parametrize("method,params,transform,pattern", FAILURES)
def test_failed_merge_writes_nothing(tmp_path, inputs, method, params, transform, pattern):
    second = transform(inputs[1]) if transform else inputs[1]
    paths = [save_adapter(a, tmp_path / f"in{i}").parent for i, a in enumerate([inputs[0], second])]
    with pytest.raises(MergeError, match=pattern):
        merge_files(paths, tmp_path / "out", method, MergeParams(**params))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in0", "in1"]


def test_nan_input_is_refused_naming_adapter_and_module(inputs):
    bad = copy.deepcopy(inputs[1])  # save_adapter refuses NaN, so this input exists only in memory
    path = next(iter(bad.layers))
    bad.layers[path].lam[0] = float("nan")
    with pytest.raises(MergeError, match=f"input 2: module {path} factor lam holds NaN"):
        merge_adapters([inputs[0], bad], "linear", MergeParams(weights=(1.0, 1.0)))


def test_out_may_not_be_an_input(tmp_path, inputs):
    save_adapter(inputs[0], tmp_path / "a")
    with pytest.raises(MergeError, match="inputs are never modified"):
        merge_files([tmp_path / "a"], tmp_path / "a", "linear", MergeParams(weights=(1.0,)))


# ----------------------------------------------------------------------------- into base

def test_into_base_equals_unmerged_adapter(tmp_path, inputs):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    assert len(list((tmp_path / "base").glob("*.safetensors"))) > 2
    merged = merge_adapters(inputs, "svd", MergeParams(weights=WEIGHTS, budget=4000))
    merge_into_base(merged, tmp_path / "base", tmp_path / "full")
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
    assert close(logits(full), logits(base, merged), 1e-5)
    assert not close(logits(full), logits(base), 1e-3)
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == sorted(p.name for p in (tmp_path / "base").iterdir())



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_into_base_streamed_shards_equal_a_naive_rewrite(tmp_path, inputs, dtype):
    """Every output tensor equals load_file(input) with the delta added in the input's dtype; untouched
    tensors are bit-identical, and the shard metadata survives."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    tiny_llama().to(dtype).save_pretrained(tmp_path / "base", max_shard_size="20KB")
    merged = merge_adapters(inputs, "linear", MergeParams(weights=WEIGHTS))
    merge_into_base(merged, tmp_path / "base", tmp_path / "full")
    for shard in sorted((tmp_path / "base").glob("*.safetensors")):
        before, after = load_file(shard), load_file(tmp_path / "full" / shard.name)
        assert list(after) == list(before)
        for key, t in before.items():
            path = key.removesuffix(".weight")
            expected = (t.float() + merged.delta(path)).to(dtype) if path in merged.layers else t
            assert after[key].dtype == dtype and torch.equal(after[key], expected), key
        with safe_open(str(shard), "pt") as a, safe_open(str(tmp_path / "full" / shard.name), "pt") as b:
            kept = {k: v for k, v in b.metadata().items() if k != MERGE_RECORD}  # plus the merge's provenance
            assert kept == a.metadata() and json.loads(b.metadata()[MERGE_RECORD])["merge"]["method"] == "linear"


def test_into_base_refuses_a_truncated_shard(tmp_path, inputs):
    tiny_llama().save_pretrained(tmp_path / "base", max_shard_size="20KB")
    shard = sorted((tmp_path / "base").glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-16])
    merged = merge_adapters(inputs, "linear", MergeParams(weights=WEIGHTS))
    with pytest.raises(MergeError, match="truncated"):
        merge_into_base(merged, tmp_path / "base", tmp_path / "full")
    assert not (tmp_path / "full").exists()

def bert_logits(model, adapter=None):
    model = copy.deepcopy(model)
    if adapter is not None:
        attach_adapter(model, adapter)
    ids = torch.arange(12).view(2, 6) % 60 + 3
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_into_base_seq_cls_head(tmp_path):
    base = tiny_bert(num_labels=2)
    a = random_adapter(base, 1, targets=("query", "value"), task_type="seq-cls", labels=["x", "y"])
    b = random_adapter(base, 2, targets=("query", "key"), task_type="seq-cls", labels=["u", "v"])
    base.save_pretrained(tmp_path / "base", max_shard_size="30KB")
    merged = merge_adapters([a, b], "linear", MergeParams(weights=(0.5, 0.5)), head_from=2)
    assert merged.labels == ["u", "v"] and set(merged.head) == set(b.head)
    merge_into_base(merged, tmp_path / "base", tmp_path / "full")
    full = AutoModelForSequenceClassification.from_pretrained(tmp_path / "full").eval()
    assert close(bert_logits(full), bert_logits(base, merged), 1e-5)

    tiny_bert(num_labels=3).save_pretrained(tmp_path / "base3")
    with pytest.raises(MergeError, match="same shape"):
        merge_into_base(merged, tmp_path / "base3", tmp_path / "full3")
    tiny_llama().save_pretrained(tmp_path / "llama")
    with pytest.raises(MergeError, match="config"):
        merge_into_base(merged, tmp_path / "llama", tmp_path / "full4")
    assert not (tmp_path / "full3").exists() and not (tmp_path / "full4").exists()


def test_headless_seq_cls_merge_says_how_to_keep_a_head():
    base = tiny_bert(num_labels=2)
    a = random_adapter(base, 1, targets=("query",), task_type="seq-cls", labels=["x", "y"])
    merged = merge_adapters([a, a], "linear", MergeParams(weights=(0.5, 0.5)))
    assert merged.head == {}
    with pytest.raises(ConfigError, match="carries no classification head .* --head-from K"):
        attach_adapter(tiny_bert(num_labels=2), merged)
