"""Spectral merging on the stacked factors: decorrelate the tasks' singular directions, flatten the spectrum.

Each task's weighted update of one module is first put in its own SVD form, U_k diag(s_k) V_k^T, from its
factors alone (`top_triplets_of_factors` of that one part). Then:

- decorrelate: stack every task's U_k side by side into U (out, R), R = sum of the tasks' ranks, and replace
  U by its nearest matrix with orthonormal columns, its polar factor U (U^T U)^(-1/2) (the same for V). The
  merged update is U_perp diag(s_1, ..., s_T) V_perp^T. Tasks whose directions overlap no longer add up
  along the shared directions (Gargiulo et al. 2025, "Task Singular Vectors", did this on dense full-rank
  task matrices at equal ranks); here every task keeps its own rank in each layer and the polar factor is
  taken from the small R x R triangular factor of a tall QR, so no (out, in) matrix is ever formed.
- isotropic: after the merge, every kept singular value of a layer takes the layer's mean (Marczak et al.
  2025, "isotropic merging"), so no task's strongest directions drown the others.

Tasks that are already mutually orthogonal decorrelate to their exact sum; one task decorrelates to itself.
"""

from __future__ import annotations

import torch

from adalora.adapter import AdapterLayer
from adalora.tools.merge.lowrank import WORK_DTYPE, numerical_rank, top_triplets_of_factors
from adalora.tools.merge.tallqr import TallQR


def polar_columns(blocks: list[torch.Tensor]) -> torch.Tensor:
    """The polar factor of [blocks[0] | blocks[1] | ...] (n, R): the closest matrix with orthonormal columns (or
    rows, when R > n) in Frobenius norm, A B^T for the stack's thin SVD A S B^T. From the stack's tall QR:
    stack = Q R, R = a s b^T, polar = Q (a b^T); directions the stack does not span (s ~ 0) are left out."""
    qr = TallQR(blocks, WORK_DTYPE)
    a, s, bh = torch.linalg.svd(qr.R, full_matrices=False)  # R (k, R): a (k, k'), s (k',), bh (k', R)
    keep = s > s.max() * max(qr.n, qr.width) * torch.finfo(WORK_DTYPE).eps
    return qr.q_times(a[:, keep] @ bh[keep], out_dtype=WORK_DTYPE)


def task_svds(parts: list[AdapterLayer]) -> list[AdapterLayer]:
    """Each part's update in SVD form (P orthonormal columns, lam its singular values, Q orthonormal rows),
    triplets of zero singular value dropped."""
    out = []
    for part in parts:
        svd = top_triplets_of_factors([part], part.rank)
        if r := numerical_rank(svd.lam, svd.P.shape[0], svd.Q.shape[1]):  # lam descending: the first r
            out.append(AdapterLayer(P=svd.P[:, :r], lam=svd.lam[:r], Q=svd.Q[:r]))
    return out


def decorrelated(parts: list[AdapterLayer]) -> list[AdapterLayer]:
    """The decorrelated sum of one module's weighted parts as one stacked-factor part (P (out, R), lam (R,),
    Q (R, in)); [] when every part is zero."""
    svds = task_svds(parts)
    if not svds:
        return []
    U = polar_columns([s.P for s in svds])
    V = polar_columns([s.Q.T for s in svds])
    return [AdapterLayer(P=U, lam=torch.cat([s.lam for s in svds]).to(WORK_DTYPE), Q=V.T)]


def flattened(layer: AdapterLayer) -> AdapterLayer:
    """The layer with every singular value replaced by their mean (lam is a layer's spectrum, all >= 0)."""
    if layer.rank == 0:
        return layer
    return AdapterLayer(P=layer.P, lam=torch.full_like(layer.lam, float(layer.lam.mean())), Q=layer.Q)
