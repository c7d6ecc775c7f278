"""decorrelate and isotropic merges (tools/merge/spectral.py) against naive dense references."""

import dataclasses

import pytest
import torch

from adalora.adapter import AdapterLayer
from adalora.tools.merge import MergeError, MergeParams, merge_adapters
from adalora.tools.merge.spectral import polar_columns
from tests.test_merge import WEIGHTS, close, dense_sum, inputs, qr_blocks  # noqa: F401 (fixtures)


def naive_polar(M):
    """A B^T of M's thin SVD, from the dense matrix (numerically zero directions left out)."""
    A, s, Bh = torch.linalg.svd(M.double(), full_matrices=False)
    keep = s > s.max() * max(M.shape) * torch.finfo(torch.float64).eps
    return A[:, keep] @ Bh[keep]


def naive_task_svd(delta):
    U, s, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    keep = s > s.max() * max(delta.shape) * 1.2e-7
    return U[:, keep], s[keep], Vh[keep]


def naive_decorrelated(adapters, weights, path):
    """Dense reference: each weighted delta's SVD, U's and V's stacked, each replaced by its polar factor."""
    svds = [naive_task_svd(w * a.delta(path)) for a, w in zip(adapters, weights) if path in a.layers]
    U = naive_polar(torch.cat([u for u, _, _ in svds], 1))
    V = naive_polar(torch.cat([vh.T for _, _, vh in svds], 1))
    return U @ torch.diag(torch.cat([s for _, s, _ in svds])) @ V.T


def naive_isotropic(adapters, weights, path):
    U, s, Vh = naive_task_svd(dense_sum(adapters, weights, path).double())
    return s.mean() * U @ Vh


@pytest.mark.parametrize("method, reference", [("decorrelate", naive_decorrelated), ("isotropic", naive_isotropic)])
def test_spectral_methods_match_dense_references(inputs, qr_blocks, method, reference):
    merged = merge_adapters(inputs, method, MergeParams(weights=WEIGHTS))
    assert set(merged.layers) == {p for a in inputs for p in a.layers}
    for path, layer in merged.layers.items():
        assert close(merged.delta(path).double(), reference(inputs, WEIGHTS, path)), path
        assert torch.all(layer.lam[:-1] >= layer.lam[1:] - 1e-6), "lam is the spectrum, descending"


def test_decorrelate_keeps_the_summed_rank_and_one_input_unchanged(inputs):
    merged = merge_adapters(inputs, "decorrelate", MergeParams(weights=WEIGHTS))
    for path, layer in merged.layers.items():
        assert layer.rank == sum(a.layers[path].rank for a in inputs if path in a.layers)
    one = merge_adapters(inputs[:1], "decorrelate", MergeParams(weights=(1.0,)))
    for path in inputs[0].layers:
        assert close(one.delta(path), inputs[0].delta(path), 1e-5)


def test_decorrelate_of_mutually_orthogonal_tasks_is_their_sum(inputs):
    """Two tasks on disjoint coordinates (orthogonal in and out): nothing to decorrelate, the exact sum."""
    a, b = dataclasses.replace(inputs[0], layers={}), dataclasses.replace(inputs[0], layers={})
    for path, layer in inputs[0].layers.items():
        P, Q = torch.zeros_like(layer.P), torch.zeros_like(layer.Q)
        half_out, half_in = layer.P.shape[0] // 2, layer.Q.shape[1] // 2
        P[half_out:], Q[:, half_in:] = layer.P[half_out:], layer.Q[:, half_in:]
        b.layers[path] = AdapterLayer(P=P, lam=layer.lam.clone(), Q=Q)
        layer_a = AdapterLayer(P=layer.P.clone(), lam=layer.lam.clone(), Q=layer.Q.clone())
        layer_a.P[half_out:], layer_a.Q[:, half_in:] = 0.0, 0.0
        a.layers[path] = layer_a
    merged = merge_adapters([a, b], "decorrelate", MergeParams(weights=(1.0, 0.5)))
    for path in a.layers:
        assert close(merged.delta(path), dense_sum([a, b], (1.0, 0.5), path), 1e-5), path


def test_decorrelate_removes_a_shared_direction_s_double_count(inputs):
    """One adapter merged with itself: the shared directions are counted once (the polar factor of [U | U] is
    [U | U] / 2), so the result is the input, not twice it."""
    merged = merge_adapters([inputs[0], inputs[0]], "decorrelate", MergeParams(weights=(1.0, 1.0)))
    for path in inputs[0].layers:
        assert close(merged.delta(path), inputs[0].delta(path), 1e-5), path


def test_polar_factor_is_orthonormal_and_nearest(qr_blocks):
    torch.manual_seed(0)
    blocks = [torch.randn(40, 3), torch.randn(40, 5)]
    polar = polar_columns(blocks)
    assert close(polar.T @ polar, torch.eye(8, dtype=polar.dtype), 1e-10)
    assert close(polar, naive_polar(torch.cat(blocks, 1)), 1e-10)


@pytest.mark.parametrize("method", ["decorrelate", "isotropic"])
def test_spectral_methods_fit_a_budget(inputs, method):
    exact = merge_adapters(inputs, method, MergeParams(weights=WEIGHTS))
    budget = exact.num_params() // 3
    merged = merge_adapters(inputs, method, MergeParams(weights=WEIGHTS, budget=budget))
    assert 0 < merged.num_params() <= budget


@pytest.mark.parametrize("method", ["decorrelate", "isotropic"])
def test_spectral_methods_refuse_a_density(inputs, method):
    with pytest.raises(MergeError, match=f"method '{method}' does not use --density"):
        merge_adapters(inputs, method, MergeParams(weights=WEIGHTS, density=0.5))
