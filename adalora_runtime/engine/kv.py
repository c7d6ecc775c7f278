"""The reference decode path: the transformers forward over one left-padded DynamicCache plus its padding mask.

Rows leave by `select` (keep some rows, then drop padding columns no kept row needs) and join by
`concat` (left-pad the shorter cache to the longer, stack rows). A row's real tokens always end at the
last column, so one decode forward appends one column for every row; padding columns are masked out
of attention (mask 0), and each row carries its own next position id.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from adalora.engine.errors import EngineError


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword under which `model.forward` takes the KV cache: `cache` where it has one (transformers 5.2x
    deprecates `past_key_values` and drops it in 5.40), else `past_key_values` (older releases)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass
class BatchKV:
    cache: DynamicCache
    """Per layer keys and values of shape (B, H, L, D); only full-attention DynamicLayers."""
    mask: torch.Tensor
    """(B, L) long: 1 where the column holds a real token of that row, 0 for left padding."""
    positions: torch.Tensor
    """(B,) long: position id of each row's next token (= its real tokens so far)."""

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def decode_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """attention_mask (B, L + 1) and position_ids (B, 1) for a forward of one new token per row."""
        ones = torch.ones_like(self.mask[:, :1])
        return torch.cat([self.mask, ones], dim=1), self.positions[:, None]

    def advance(self) -> None:
        """After a decode forward appended one column (the new token of every row)."""
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.positions = self.positions + 1


def prefill_inputs(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded input_ids (n, P), attention_mask (n, P) and position_ids (n, P) of n prompts."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # (n, P) 0 on padding and on each row's first token
    return ids.to(device), mask.to(device), positions.to(device)


def _layers(kv: BatchKV):
    return kv.cache.layers


def select(kv: BatchKV, rows: list[int]) -> BatchKV | None:
    """The cache of `rows` only (in that order), without padding columns that none of them uses."""
    if not rows:
        return None
    index = torch.tensor(rows, dtype=torch.long, device=kv.mask.device)
    mask = kv.mask[index]  # (b, L)
    used = mask.any(dim=0)  # (L,)
    start = int(used.nonzero()[0]) if used.any() else mask.shape[1]
    for layer in _layers(kv):
        layer.keys = layer.keys[index, :, start:]
        layer.values = layer.values[index, :, start:]
    return BatchKV(kv.cache, mask[:, start:], kv.positions[index])


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def concat(a: BatchKV | None, b: BatchKV) -> BatchKV:
    """Rows of `a` then rows of `b`, both left-padded to the longer cache; `a` None = `b` alone."""
    if a is None:
        return b
    width = max(a.mask.shape[1], b.mask.shape[1])
    for la, lb in zip(_layers(a), _layers(b), strict=True):
        la.keys = torch.cat([_left_pad(la.keys, width, 2), _left_pad(lb.keys, width, 2)], dim=0)  # (Ba + Bb, H, L, D)
        la.values = torch.cat([_left_pad(la.values, width, 2), _left_pad(lb.values, width, 2)], dim=0)
    mask = torch.cat([_left_pad(a.mask, width, 1), _left_pad(b.mask, width, 1)], dim=0)  # (Ba + Bb, L)
    return BatchKV(a.cache, mask, torch.cat([a.positions, b.positions]))


class HfDecoder:
    """The Generator's decoder over the transformers forward of any causal LM with full-attention layers: the
    reference of the lean path (engine.lean), and the path of every model that one does not run."""

    name = "hf"

    def __init__(self, model: torch.nn.Module) -> None:
        if any(type(layer) is not DynamicLayer for layer in DynamicCache(config=model.config).layers):
            raise EngineError(f"{type(model).__name__} has sliding-window or other non-full-attention cache layers, "
                              f"which this generator's left-padded batch cache does not handle")
        self.model = model
        self.device = next(model.parameters()).device
        self.cache_kw = cache_argument(model)
        self.kv: BatchKV | None = None

    @property
    def rows(self) -> int:
        return 0 if self.kv is None else self.kv.rows

    @staticmethod
    def prefill_tokens(lengths: list[int]) -> list[int]:
        """Tokens the adapter context routes for each row of a prefill of prompts of these lengths: every row is
        left-padded to the longest."""
        return [max(lengths)] * len(lengths)

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """New rows for `prompts` after the running ones -> logits (n, vocab) of each prompt's last token. The
        adapter context routes n * P tokens (P = the longest prompt, shorter ones left-padded)."""
        ids, mask, positions = prefill_inputs(prompts, self.device)  # (n, P) each
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **{self.cache_kw: cache},
                         use_cache=True, logits_to_keep=1)
        self.kv = concat(self.kv, BatchKV(cache, mask, mask.sum(dim=1)))  # the forward filled `cache` in place
        return out.logits[:, -1]

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) long, one per running row -> logits (B, vocab)."""
        attention_mask, position_ids = self.kv.decode_inputs()  # (B, L + 1), (B, 1)
        out = self.model(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=position_ids,
                         **{self.cache_kw: self.kv.cache}, use_cache=True)
        self.kv.advance()
        return out.logits[:, -1]

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows`, in that order."""
        self.kv = select(self.kv, rows) if rows else None

    def clear(self) -> None:
        self.kv = None
