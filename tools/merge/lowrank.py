"""Low-rank merging: the exact weighted sum as a concatenation of factors, and its re-compression to a
global parameter budget by singular value, never forming a dense (out, in) delta.

Every input's scale (lora_alpha / init_r) and merge weight is folded into its lam, so the merged
factors reproduce sum_i w_i * delta_i with scale 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adalora.adapter import Adapter, AdapterLayer
from adalora.allocator import keep_mask
from adalora.delta import delta_weight, fold
from adalora.tools.merge.tallqr import TallQR

WORK_DTYPE = torch.float64
"""QR/SVD of the small stacked factors run in float64 (cheap at these ranks); outputs are float32."""


@dataclass
class Spectrum:
    """Thin SVD of one layer's merged update: delta = U diag(s) Vh. U (out, k), s (k,) descending, Vh (k, in)."""

    U: torch.Tensor
    s: torch.Tensor
    Vh: torch.Tensor


def union_shapes(adapters: list[Adapter]) -> dict[str, tuple[int, int]]:
    """Every module adapted by any input, in first-seen order (a module missing from an input is zero there)."""
    shapes: dict[str, tuple[int, int]] = {}
    for adapter in adapters:
        for path, shape in adapter.shapes.items():
            shapes.setdefault(path, tuple(shape))
    return shapes


def folded_factors(adapter: Adapter, path: str, weight: float) -> AdapterLayer | None:
    """The input's factors with lam, its scale and `weight` folded into Q (delta.fold; lam becomes ones), so that
    P diag(1) Q is its weighted delta; None where the module has rank 0."""
    layer = adapter.layers.get(path)
    if layer is None:
        return None
    A, B = fold(layer.P, layer.lam, layer.Q, adapter.scale * weight)  # (r, in), (out, r)
    return AdapterLayer(B, torch.ones_like(layer.lam), A)


def layer_parts(adapters: list[Adapter], weights: list[float], path: str) -> list[AdapterLayer]:
    """One module's weighted inputs, each input's lam, weight and scale folded into its Q (rank-0 inputs left out):
    their deltas sum to the exact merged update."""
    return [f for a, w in zip(adapters, weights) if (f := folded_factors(a, path, w)) is not None]


def concat_layer(adapters: list[Adapter], weights: list[float], path: str) -> AdapterLayer | None:
    """Exact weighted sum of one module as stacked factors: P (out, R), lam (R,), Q (R, in), R = sum of ranks."""
    parts = layer_parts(adapters, weights, path)
    if not parts:
        return None
    return AdapterLayer(P=torch.cat([p.P.float() for p in parts], dim=1), lam=torch.cat([p.lam.float() for p in parts]),
                        Q=torch.cat([p.Q.float() for p in parts], dim=0))


def _factored_core(parts: list[AdapterLayer]) -> tuple[TallQR, TallQR, torch.Tensor]:
    """sum_k P_k diag(lam_k) Q_k = Qp (Rp diag(lam) Rq^T) Qq^T with Qp, Qq orthonormal: the QRs of the stacked P
    and of the stacked Q^T (by row blocks, never stacked whole) and the small core Rp diag(lam) Rq^T (k1, k2)."""
    p = TallQR([part.P for part in parts], WORK_DTYPE)
    q = TallQR([part.Q.T for part in parts], WORK_DTYPE)
    lam = torch.cat([part.lam for part in parts]).to(WORK_DTYPE)
    return p, q, delta_weight(p.R, lam, q.R.T, 1.0)


def singular_values_of_factors(parts: list[AdapterLayer]) -> torch.Tensor:
    """Singular values (descending) of the summed update of `parts`: those of the small core alone."""
    return torch.linalg.svdvals(_factored_core(parts)[2])


def top_triplets_of_factors(parts: list[AdapterLayer], r: int) -> AdapterLayer:
    """The best rank-r approximation of the summed update of `parts` (Eckart-Young) as an AdaLoRA-shaped layer:
    P orthonormal columns (out, r), lam = the top singular values, Q orthonormal rows (r, in). Only the r kept
    columns of the orthonormal bases are multiplied out, a row block at a time, so a layer's working set is
    one row block and the outputs, not (out + in) x R numbers."""
    p, q, core = _factored_core(parts)
    U, s, Vh = torch.linalg.svd(core, full_matrices=False)  # (k1, k), (k,), (k, k2)
    return AdapterLayer(P=p.q_times(U[:, :r]), lam=s[:r].float(), Q=q.q_times(Vh[:r].T).T.contiguous())


def spectrum_of_dense(delta: torch.Tensor) -> Spectrum:
    """Exact thin SVD of one dense (out, in) update (the dense merge methods' result)."""
    U, s, Vh = torch.linalg.svd(delta.to(WORK_DTYPE), full_matrices=False)
    return Spectrum(U=U, s=s, Vh=Vh)


def top_r(spectrum: Spectrum, r: int) -> Spectrum:
    """The top r triplets of a spectrum (all of it when it has fewer), copied so that the rest is freed."""
    return Spectrum(U=spectrum.U[:, :r].clone(), s=spectrum.s[:r].clone(), Vh=spectrum.Vh[:r].clone())


def numerical_rank(s: torch.Tensor, out_f: int, in_f: int) -> int:
    """Singular values above max(out, in) * eps * s_max (numpy's matrix_rank rule, float32 eps)."""
    if s.numel() == 0:
        return 0
    tol = float(s.max()) * max(out_f, in_f) * torch.finfo(torch.float32).eps
    return int((s > tol).sum())


def kept_ranks(singular: dict[str, tuple[torch.Tensor, int, int]], budget: int | None) -> dict[str, int]:
    """Per layer, how many leading singular values to keep: the globally largest whose triplets
    (in + out + 1 params each) fit `budget`; budget None keeps every numerically nonzero one (exact).

    singular: path -> (s (k,) descending, out, in)."""
    kept = {path: numerical_rank(s, out_f, in_f) for path, (s, out_f, in_f) in singular.items()}
    if budget is not None and any(kept.values()):
        paths = [p for p in singular if kept[p]]
        scores = torch.cat([singular[p][0][:kept[p]].float() for p in paths])
        costs = torch.cat([torch.full((kept[p],), float(singular[p][1] + singular[p][2] + 1)) for p in paths])
        mask = keep_mask(scores, costs, budget)
        offset = 0
        for p in paths:
            n = kept[p]
            kept[p] = int(mask[offset:offset + n].sum())  # a prefix: the spectrum is sorted descending
            offset += n
    return kept


def truncate(spectrum: Spectrum, r: int) -> AdapterLayer:
    """AdaLoRA-shaped layer of the top r triplets: P orthonormal columns (out, r), lam = singular values,
    Q orthonormal rows (r, in)."""
    return AdapterLayer(P=spectrum.U[:, :r].float().contiguous(), lam=spectrum.s[:r].float().contiguous(),
                        Q=spectrum.Vh[:r].float().contiguous())


def select(spectra: dict[str, Spectrum], budget: int | None) -> dict[str, AdapterLayer]:
    """kept_ranks over spectra held in memory, then truncate each (the dense methods' single pass)."""
    kept = kept_ranks({p: (sp.s, sp.U.shape[0], sp.Vh.shape[1]) for p, sp in spectra.items()}, budget)
    return {path: truncate(sp, kept[path]) for path, sp in spectra.items() if kept[path]}
