"""QR of a tall matrix held as column blocks side by side, computed a row block at a time.

The svd merge factors A = [A_1 | A_2 | ...] (n, R): the inputs' P factors (or their Q^T), each (n, r_k).
Stacking them and running one QR holds A and its (n, R) orthonormal factor at once, a few copies of
(n x R) numbers per layer. This two-level tall-skinny QR never holds either:

    row blocks B_j = A[rows_j] = Q_j R_j,   S = [R_1; R_2; ...] = Q_top R,   so  A = diag(Q_j) Q_top R

R is A's triangular factor; diag(Q_j) Q_top its orthonormal one, applied to a small matrix one row block at
a time (`q_times`), each Q_j recomputed from its block. Every piece is a Householder QR, so the orthonormal
factor stays orthonormal when A is rank deficient (one adapter merged with itself).
"""

from __future__ import annotations

import math

import torch

ROW_BLOCK = 512
"""Rows per block at least."""
BLOCK_WIDTHS = 4
"""A block also has at least this many times A's width (R) in rows, so the stack S is at most 1/4 of A."""


def row_blocks(n: int, width: int) -> list[slice]:
    """n rows split evenly into blocks of at least max(ROW_BLOCK, BLOCK_WIDTHS * width) rows (one block if n is
    smaller). Both constants are read at each call, so a test can make the blocks tiny."""
    count = max(1, n // max(ROW_BLOCK, BLOCK_WIDTHS * width, 1))
    bounds = [math.floor(i * n / count) for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def _householder(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LAPACK geqrf of one block: its reflectors (a, tau) and its triangular factor (min(b, R), R)."""
    a, tau = torch.geqrf(block)
    return a, tau, a[:tau.shape[0]].triu()


def _apply_q(a: torch.Tensor, tau: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Q_thin @ W (b, c) for the block's reflectors, W (k, c): the full Q applied to [W; 0], Q never formed."""
    padded = W.new_zeros(a.shape[0], W.shape[1])
    padded[:W.shape[0]] = W
    return torch.ormqr(a, tau, padded)


class TallQR:
    """A = [columns[0] | columns[1] | ...] = Q R in `dtype`, with only R and the blocks' triangular factors held.

    columns: tensors (n, r_k), any float dtype (cast one row block at a time). R: (k, R) upper triangular,
    k = min(n, R); Q (n, k) is only ever applied (`q_times`)."""

    def __init__(self, columns: list[torch.Tensor], dtype: torch.dtype = torch.float64) -> None:
        if not columns:
            raise ValueError("TallQR needs at least one column block")
        self.columns, self.dtype = columns, dtype
        self.n, self.width = columns[0].shape[0], sum(c.shape[1] for c in columns)
        self.blocks = row_blocks(self.n, self.width)
        block_r = [_householder(self.rows(b))[2] for b in self.blocks]
        self._block_k = [r.shape[0] for r in block_r]
        self._top_q: torch.Tensor | None = None
        if len(block_r) == 1:
            self.R = block_r[0]
        else:
            self._top_q, self.R = torch.linalg.qr(torch.cat(block_r))

    def rows(self, block: slice) -> torch.Tensor:
        """A[block] in the working dtype (the only copy of A's numbers ever made, one block at a time)."""
        out = torch.empty(block.stop - block.start, self.width, dtype=self.dtype)
        offset = 0
        for c in self.columns:
            out[:, offset:offset + c.shape[1]] = c[block]
            offset += c.shape[1]
        return out

    def q_times(self, C: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Q @ C (n, c) for C (k, c), written into an `out_dtype` tensor one row block at a time. Each block's
        reflectors are recomputed by the same LAPACK call on the same numbers as its R_j in __init__, hence the
        same factorization; holding them instead would hold all of A again."""
        C = C.to(self.dtype)
        W = C if self._top_q is None else self._top_q @ C
        out = torch.empty(self.n, C.shape[1], dtype=out_dtype)
        offset = 0
        for block, k in zip(self.blocks, self._block_k):
            a, tau, _ = _householder(self.rows(block))
            out[block] = _apply_q(a, tau, W[offset:offset + k])
            offset += k
        return out
