"""The row-block QR of the svd merge against torch.linalg.qr of the stacked matrix, on tiny blocks (many of
them, some with fewer rows than columns) and in one block, full rank and rank deficient."""

import pytest
import torch

from adalora.tools.merge import tallqr
from adalora.tools.merge.tallqr import TallQR, row_blocks


@pytest.fixture
def tiny_blocks(monkeypatch):
    def set_blocks(rows: int, widths: int) -> None:
        monkeypatch.setattr(tallqr, "ROW_BLOCK", rows)
        monkeypatch.setattr(tallqr, "BLOCK_WIDTHS", widths)
    return set_blocks


def columns(n, widths, seed, duplicate=False, transposed=False):
    """Float32 column blocks (n, w); `duplicate` repeats the first block (rank deficient); `transposed` passes
    them as .T views of (w, n) tensors, as the merge passes Q^T."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [torch.randn(w, n, generator=gen).T if transposed else torch.randn(n, w, generator=gen) for w in widths]
    return blocks + [blocks[0].clone()] if duplicate else blocks


# (n, column widths, ROW_BLOCK, BLOCK_WIDTHS, duplicate, transposed)
CASES = [
    (40, [3, 5], 512, 4, False, False),  # one block: a plain QR
    (40, [3, 5], 6, 0, False, False),  # 6 blocks of 6-7 rows: fewer rows than columns
    (40, [3, 5], 10, 1, True, False),  # rank deficient, 4 blocks
    (37, [4, 4, 2], 8, 0, False, True),  # uneven blocks, strided views
    (5, [3, 4], 1, 0, False, False),  # wide: n < R, 5 one-row blocks
    (300, [12, 12, 7], 16, 2, True, True),
]


@pytest.mark.parametrize("n,widths,rows,block_widths,duplicate,transposed", CASES)
def test_tall_qr_is_a_qr_of_the_stacked_matrix(tiny_blocks, n, widths, rows, block_widths, duplicate, transposed):
    tiny_blocks(rows, block_widths)
    parts = columns(n, widths, seed=n, duplicate=duplicate, transposed=transposed)
    A = torch.cat(parts, dim=1).double()
    qr = TallQR(parts)
    k = min(A.shape)
    assert qr.R.shape == (k, A.shape[1]) and torch.equal(qr.R, qr.R.triu())
    Q = qr.q_times(torch.eye(k), out_dtype=torch.float64)  # (n, k): the whole orthonormal factor
    assert torch.allclose(Q.T @ Q, torch.eye(k, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(Q @ qr.R, A, atol=1e-12)
    reference = torch.linalg.qr(A, mode="r").R  # R is unique up to the sign of each row
    assert torch.allclose(qr.R.T @ qr.R, reference.T @ reference, atol=1e-10)
    C = torch.randn(k, 3, dtype=torch.float64)
    assert torch.allclose(qr.q_times(C), (Q @ C).float(), atol=1e-6)


@pytest.mark.parametrize("n,width,rows,block_widths,expected", [
    (1536, 96, 512, 4, [512] * 3),
    (1536, 200, 512, 4, [1536]),
    (4096, 200, 512, 4, [819] * 4 + [820]),
    (576, 96, 512, 4, [576]),
    (100, 3, 512, 4, [100]),
    (10, 2, 3, 0, [3, 3, 4]),
    (7, 2, 1, 0, [1] * 7),
])
def test_row_blocks_cover_every_row_once(tiny_blocks, n, width, rows, block_widths, expected):
    tiny_blocks(rows, block_widths)
    blocks = row_blocks(n, width)
    assert [b.stop - b.start for b in blocks] == expected
    assert blocks[0].start == 0 and blocks[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))


def test_no_columns_is_an_error():
    with pytest.raises(ValueError, match="at least one column block"):
        TallQR([])

