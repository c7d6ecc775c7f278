"""A preallocated KV cache with per-row lengths, for the lean decode path (engine.lean).

Keys and values of every layer live in one tensor each, (layers, rows, kv_heads, capacity, head_dim). Running
row b holds its tokens in columns [0, lengths[b]) of cache row b: nothing is left-padded, so a row that joins
writes only its own rows (an admission costs its own rows, not the batch's), and a decode step writes one column
per row, at that row's own length. Rows that leave are closed up by moving the later rows down (`keep`); the
column capacity doubles when a row reaches it. Attention reads columns [0, max(lengths)) under a per-row mask.
"""

from __future__ import annotations

import torch


class RowCache:
    """Keys and values of up to `rows` running requests, each at its own length."""

    def __init__(self, layers: int, rows: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, capacity: int = 64, limit: int | None = None) -> None:
        self.shape = (layers, rows, kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.limit = limit
        """Most columns a row may reach (the model's positions); None = no bound."""
        self.keys = self._empty(capacity)  # (layers, rows, kv_heads, capacity, head_dim)
        self.values = self._empty(capacity)
        self.lengths: list[int] = []
        """Tokens in the cache of each running row, in row order (host copy: no device sync to read)."""
        self.grown = 0
        """How many times the tensors were replaced by larger ones (what a CUDA graph over them checks)."""

    def _empty(self, capacity: int) -> torch.Tensor:
        layers, rows, kv_heads, head_dim = self.shape
        return torch.zeros(layers, rows, kv_heads, capacity, head_dim, dtype=self.dtype, device=self.device)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def reserve(self, columns: int) -> None:
        """Make room for rows of `columns` tokens: the capacity at least doubles when it grows (amortized copy)."""
        if columns <= self.capacity:
            return
        grown = max(columns, 2 * self.capacity)
        if self.limit is not None:
            grown = max(columns, min(grown, self.limit))
        used = max(self.lengths, default=0)
        keys, values = self._empty(grown), self._empty(grown)
        keys[:, :, :, :used] = self.keys[:, :, :, :used]
        values[:, :, :, :used] = self.values[:, :, :, :used]
        self.keys, self.values = keys, values
        self.grown += 1

    def join(self, lengths: list[int]) -> slice:
        """Open rows for requests whose prompts have these lengths (their prefill writes them next); returns
        their cache rows."""
        start = self.rows
        if start + len(lengths) > self.shape[1]:
            raise ValueError(f"{start} rows run and {len(lengths)} join, but the cache holds {self.shape[1]}")
        self.reserve(max(lengths))
        self.lengths += lengths
        return slice(start, self.rows)

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (ascending), in that order: each moves down into the first free row, copying only its
        own tokens. The columns left behind are zeroed (`_zero_past`)."""
        if any(b <= a for a, b in zip(rows, rows[1:])):
            raise ValueError(f"rows to keep must ascend, got {rows}")
        for new, old in enumerate(rows):
            if new != old:  # old > new, and row `new` is no later row's source
                length = self.lengths[old]
                self.keys[:, new, :, :length] = self.keys[:, old, :, :length]
                self.values[:, new, :, :length] = self.values[:, old, :, :length]
        before, self.lengths = self.lengths, [self.lengths[old] for old in rows]
        self._zero_past(before)

    def clear(self) -> None:
        before, self.lengths = self.lengths, []
        self._zero_past(before)

    def _zero_past(self, before: list[int]) -> None:
        """Zero what each row held before (`before`, one column more: a step that failed may have written it) past
        what it holds now. A decode step on a GPU reads a window of columns under a mask, and a masked NaN (what a
        request that overflowed leaves) still turns attention into NaN: so the columns past each row's length stay
        zero for its next occupant."""
        for row, held in enumerate(before):
            now = self.lengths[row] if row < len(self.lengths) else 0
            end = min(held + 1, self.capacity)
            if end > now:
                self.keys[:, row, :, now:end] = 0
                self.values[:, row, :, now:end] = 0

    def step_positions(self) -> torch.Tensor:
        """(B,) long: the column (= position id) each running row's next token is written to."""
        return torch.tensor(self.lengths, dtype=torch.long, device=self.device)

    def advance(self) -> None:
        """After a decode step wrote one column of every row (`ensure_next` made room for it)."""
        self.lengths = [length + 1 for length in self.lengths]

    def ensure_next(self) -> None:
        """Room for one more column in every running row (call before a decode step)."""
        self.reserve(max(self.lengths, default=0) + 1)

    def write_row(self, layer: int, row: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values (kv_heads, P, head_dim) of a new row's prompt into its columns [0, P)."""
        width = keys.shape[1]
        self.keys[layer, row, :, :width] = keys
        self.values[layer, row, :, :width] = values

    def write_step(self, layer: int, columns: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values (B, kv_heads, 1, head_dim) of one new token per running row, at each row's `columns` (B,)."""
        rows = torch.arange(columns.shape[0], device=self.device)
        self.keys[layer, rows, :, columns] = keys[:, :, 0]  # (B, kv_heads, head_dim)
        self.values[layer, rows, :, columns] = values[:, :, 0]

    def window(self, layer: int, rows: slice, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (n, kv_heads, width, head_dim) of `rows`, columns [0, width)."""
        return self.keys[layer, rows, :, :width], self.values[layer, rows, :, :width]
