"""Low-rank merging: the exact weighted sum as a concatenation of factors, and its re-compression to a
global parameter budget by singular value, never forming a dense (out, in) delta.

Every input's scale (lora_alpha / init_r) and merge weight is folded into its lam, so the merged
factors reproduce sum_i w_i * delta_i with scale 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adalora_runtime.adapter import Adapter, AdapterLayer
from adalora_runtime.allocator import keep_mask
from adalora_runtime.delta import delta_weight

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
    """The input's factors with `weight * scale` folded into lam; None where the module has rank 0."""
    layer = adapter.layers.get(path)
    if layer is None:
        return None
    return AdapterLayer(layer.P, layer.lam * (adapter.scale * weight), layer.Q)


def concat_layer(adapters: list[Adapter], weights: list[float], path: str,
                 dtype: torch.dtype = torch.float32) -> AdapterLayer | None:
    """Exact weighted sum of one module as stacked factors: P (out, R), lam (R,), Q (R, in), R = sum of ranks."""
    parts = [f for a, w in zip(adapters, weights) if (f := folded_factors(a, path, w)) is not None]
    if not parts:
        return None
    return AdapterLayer(
        P=torch.cat([p.P.to(dtype) for p in parts], dim=1),
        lam=torch.cat([p.lam.to(dtype) for p in parts]),
        Q=torch.cat([p.Q.to(dtype) for p in parts], dim=0),
    )


def singular_values_of_factors(layer: AdapterLayer) -> torch.Tensor:
    """Singular values (descending) of P diag(lam) Q: the triangular factors of QR(P) and QR(Q^T) hold all of
    it (delta = Qp (Rp diag(lam) Rq^T) Qq^T with orthonormal Qp, Qq), so neither orthonormal factor is formed."""
    P, lam, Q = (t.to(WORK_DTYPE) for t in (layer.P, layer.lam, layer.Q))
    Rp = torch.linalg.qr(P, mode="r").R  # (k1, R)
    Rq = torch.linalg.qr(Q.T, mode="r").R  # (k2, R)
    return torch.linalg.svdvals(delta_weight(Rp, lam, Rq.T, 1.0))


def top_triplets_of_factors(layer: AdapterLayer, r: int) -> AdapterLayer:
    """The best rank-r approximation of P diag(lam) Q (Eckart-Young) as an AdaLoRA-shaped layer: P orthonormal
    columns (out, r), lam = the top singular values, Q orthonormal rows (r, in). From QR of P and of Q^T and an
    SVD of the small core; only r columns of the (out, R) and (in, R) orthonormal bases are multiplied out,
    and each input copy is dropped once used, so one layer's working set stays near (out + in) * R numbers."""
    lam = layer.lam.to(WORK_DTYPE)
    Qp, Rp = torch.linalg.qr(layer.P.to(WORK_DTYPE))  # (out, k1), (k1, R)
    Qq, Rq = torch.linalg.qr(layer.Q.to(WORK_DTYPE).T)  # (in, k2), (k2, R)
    U, s, Vh = torch.linalg.svd(delta_weight(Rp, lam, Rq.T, 1.0), full_matrices=False)  # core (k1, k2)
    P = (Qp @ U[:, :r]).float()  # (out, r)
    del Qp
    return AdapterLayer(P=P, lam=s[:r].float(), Q=(Vh[:r] @ Qq.T).float())  # Q (r, in)


def spectrum_of_dense(delta: torch.Tensor) -> Spectrum:
    """Exact thin SVD of one dense (out, in) update (the dense merge methods' result)."""
    U, s, Vh = torch.linalg.svd(delta.to(WORK_DTYPE), full_matrices=False)
    return Spectrum(U=U, s=s, Vh=Vh)


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
