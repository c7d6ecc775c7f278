"""CUDA graphs of the lean path's decode step, over bucketed batch sizes and attention widths.

On a GPU a decode step of a small model is its kernel launches and Python, not its bytes: the H200 reads SmolLM2's
weights in ~0.13 ms and an eager step took ~30 ms (docs/BENCHMARKS.md). `DecodeGraphs` captures the step once per
(rows, width, adapters) bucket and replays it: the running rows are padded to the next bucket of rows (1, 2, 4, ...,
the cache's rows), attention reads a power-of-two window of columns under a per-row mask, and everything a replay
reads lives in static tensors, filled before each replay:

- the step's tokens, each row's column (its position) and each row's slot, in buffers of the cache's rows; padding
  rows run token 0 at column 0 of a cache row no request holds, on the base model;
- the adapters of every fused projection as `PaddedFactors`: each slot's factors of all its parts zero-padded into
  one (slots + 1, in, R) and one (slots + 1, R, out) tensor (the extra slot all zeros: the base model), so a row's
  delta is two batched matmuls over its slot's entries (what a BGMV kernel computes), the same tensors for every
  composition. A load or unload rewrites its own slot in place, so the graphs stay valid; only a rank past what
  the tensors hold reallocates them, and the graphs are captured again.

A prefill is not captured (its shapes vary), but it runs its adapters through the same padded factors (`route`):
two batched matmuls a projection, where the eager plans launch a few per adapter of the batch.

A step whose rows run a weighted mixture of adapters runs eagerly (the lean path's plans): a mixture has no single
slot per row. So does every step once a capture failed (`failed` says why, and a warning is logged); an error of the
step itself (its eager run before each capture) is raised as the eager step's would be.

Cache rows are read under a mask past each row's length (up to the window), so what a departed row left there must
be finite: RowCache zeroes the columns rows leave behind (`keep`, `clear`), or a row that ended in NaN would turn the
next occupant's attention into NaN.

The padded factors are extra device memory beside the slots' own factors, (slots + 1) * R * (in + out) elements a
projection, R padded to the largest rank loaded (it does not shrink when that adapter unloads); the server's
--max-device-bytes does not count them.

Without `capture` (a CPU) the same static step runs eagerly: that is how the tests check it against the transformers
forward here, and a GPU run (tests/test_cuda.py) checks the captured graphs the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from adalora.engine.apply import gathered_add_
from adalora.engine.slots import SlotBank

log = logging.getLogger(__name__)

MIN_WIDTH = 64
"""The narrowest attention window a graph reads; windows double from it up to the cache's capacity."""
ROUTE_TOKENS = 1024
"""The longest prefill (all its prompts' tokens) that runs its adapters through the padded factors."""
GATHER_BYTES = 64 << 20
"""The most factor bytes one batched matmul of PaddedFactors gathers (rows beyond it go in further chunks)."""
RANK_STEP = 8
"""Padded ranks are a positive multiple of this (at least one step before any adapter is loaded), so that a load
of a slightly larger rank rewrites in place."""


def row_buckets(rows: int) -> tuple[int, ...]:
    """Batch sizes graphs are captured for: powers of two below `rows`, then `rows`."""
    sizes, size = [], 1
    while size < rows:
        sizes.append(size)
        size *= 2
    return (*sizes, rows)


def bucket(n: int, sizes: Sequence[int]) -> int | None:
    """The smallest of `sizes` (ascending) holding n, or None."""
    return next((s for s in sizes if s >= n), None)


def width_bucket(columns: int, capacity: int) -> int:
    """The attention window of a step whose longest row reaches `columns` tokens: the next power of two from
    MIN_WIDTH, at most the cache's capacity (which holds `columns`)."""
    width = MIN_WIDTH
    while width < columns:
        width *= 2
    return min(width, capacity)


class PaddedFactors:
    """One fused projection's adapters for a static-shape step: AT (slots + 1, in, R) and BT (slots + 1, R, out),
    part p (a bank and its columns of the output) at rows [r_p, r_p + R_p) of R, each slot's factors zero-padded to
    R_p (a positive multiple of RANK_STEP, at least its largest rank); the last slot all zeros. x (N, in) of rows on
    slots s (N,): y += (x @ AT[s]) @ BT[s]. Memory: (slots + 1) * R * (in + out) elements."""

    def __init__(self, parts: Sequence[tuple[SlotBank, slice]], in_features: int, out_features: int) -> None:
        self.parts = list(parts)
        bank = self.parts[0][0]
        self.slots = bank.size
        self.shape = (in_features, out_features)
        self.device, self.dtype = bank.device, bank.dtype
        self.AT = self.BT = None
        self.widths: list[int] = []
        self.seen: list[tuple[int, ...]] = [() for _ in self.parts]
        """Each part's slot versions at the last refresh: a slot whose version moved is written again."""
        self.generations: list[int] = []
        """Each part's bank generation at the last refresh: while they hold, nothing is read (a step's check)."""

    def refresh(self) -> bool:
        """Bring the tensors up to the banks' slots; True when they were reallocated (a rank grew past its padding:
        a graph captured over the old ones is stale), False when written in place or unchanged."""
        generations = [bank.generation for bank, _ in self.parts]
        if generations == self.generations:
            return False
        try:
            grown = self._write()
        except BaseException:  # (out of memory, say) half written: start over from nothing at the next refresh
            self.AT = self.BT = None
            self.widths, self.seen, self.generations = [], [() for _ in self.parts], []
            raise
        self.generations = generations
        return grown

    def _write(self) -> bool:
        """refresh's work: reallocate if a rank outgrew its padding (True), then write every slot written since."""
        widths = [max(1, -(-max(bank.rank_of(s) for s in range(self.slots)) // RANK_STEP)) * RANK_STEP
                  for bank, _ in self.parts]
        grown = self.AT is None or any(w > old for w, old in zip(widths, self.widths))
        if grown:
            self.widths = [max(w, old) for w, old in zip(widths, self.widths or widths)]
            total = sum(self.widths)
            self.AT = torch.zeros(self.slots + 1, self.shape[0], total, device=self.device, dtype=self.dtype)
            self.BT = torch.zeros(self.slots + 1, total, self.shape[1], device=self.device, dtype=self.dtype)
            self.seen = [() for _ in self.parts]
        start = 0
        for p, ((bank, columns), width) in enumerate(zip(self.parts, self.widths)):
            versions = bank.versions(tuple(range(self.slots)))
            for slot, version in enumerate(versions):
                if self.seen[p] and self.seen[p][slot] == version:
                    continue
                self.AT[slot, :, start: start + width] = 0
                self.BT[slot, start: start + width] = 0
                factors = bank.factors(slot)
                if factors is not None and factors.rank:
                    r = factors.rank
                    self.AT[slot, :, start: start + r] = factors.A.T
                    self.BT[slot, start: start + r, columns] = factors.B.T
            self.seen[p] = versions
            start += width
        return grown

    def add_to(self, y: torch.Tensor, x: torch.Tensor, slots: torch.Tensor) -> None:
        """y (N, out) += each row's delta, in place; x (N, in), slots (N,) long (self.slots: the base model). Rows
        go in chunks of about GATHER_BYTES of gathered factors (a long prefill; at least one row a chunk)."""
        per_row = (self.AT[0].numel() + self.BT[0].numel()) * self.AT.element_size()
        chunk = max(1, GATHER_BYTES // per_row)
        for start in range(0, x.shape[0], chunk):
            rows = slice(start, start + chunk)
            gathered_add_(y[rows], x[rows], self.AT[slots[rows]], self.BT[slots[rows]])


@dataclass(frozen=True)
class SlotRoute:
    """The routing of a static-shape step, in the holder's place of a BatchContext: row i runs slot slots[i] (the
    padded factors' zero slot: the base model), each fused projection through its PaddedFactors."""

    slots: torch.Tensor
    factors: dict
    """Projection -> its PaddedFactors (absent: that projection has no adapted part)."""


class DecodeGraphs:
    """Captures and replays a LeanLlama's decode step (see the module's docstring). `decode` returns None where the
    step must run eagerly; `replays`, `captures`, `eager`, `routed` (prefills through `route`) and `failed` say
    what it did."""

    def __init__(self, lean, capture: bool = True) -> None:
        self.lean = lean
        self.capture = capture
        rows = lean.cache.shape[1]
        device = lean.cache.device
        self.buckets = row_buckets(rows)
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.columns = torch.zeros(rows, dtype=torch.long, device=device)
        self.slots = torch.zeros(rows, dtype=torch.long, device=device)
        self.factors = {projection: PaddedFactors(projection.parts, *projection.dense.weight.shape[::-1])
                        for layer in lean.layers for projection in (layer.qkv, layer.o, layer.gate_up, layer.down)
                        if projection.parts}
        self.zero_slot = next(iter(self.factors.values())).slots if self.factors else 0
        self.banks = list({bank: None for factors in self.factors.values() for bank, _ in factors.parts})
        self.generations: list[int] = []
        """Every bank's generation when the padded factors were last brought up to them: a step compares one list."""
        self.graphs: dict[tuple[int, int, bool], tuple[Callable[[], None], torch.Tensor]] = {}
        self.cache_seen: tuple = (None, 0)
        """(the cache, its growth count) the graphs write into: a grown cache has new tensors, captured again."""
        self.pool = None
        self.replays = self.captures = self.eager = self.routed = 0
        self.failed: str | None = None

    def decode(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """The lean path's decode (tokens (B,) -> logits (B, vocab), each row's cache one longer), or None where
        this step runs eagerly instead."""
        cache = self.lean.cache
        context = self.lean.holder.current
        routes = context is not None and bool(context.routes)
        slots = context.token_slots if routes else None
        rows = bucket(tokens.shape[0], self.buckets)  # the largest bucket is the cache's rows: never None here
        if self.failed is not None or (routes and slots is None):
            self.eager += 1
            return None
        cache.ensure_next()
        width = width_bucket(max(cache.lengths) + 1, cache.capacity)
        if (cache, cache.grown) != self.cache_seen:  # a new or grown cache: new tensors
            self._drop()
            self.cache_seen = (cache, cache.grown)
        if routes:
            self._refresh()
        n = tokens.shape[0]
        self.tokens[:n] = tokens
        self.tokens[n:] = 0
        self.columns[:n] = cache.step_positions()
        self.columns[n:] = 0
        self.slots[n:] = self.zero_slot
        if routes:
            self.slots[:n] = torch.where(slots < 0, self.zero_slot, slots)
        key = (rows, width, routes)
        if not self.capture:
            logits = self._step(*key)
        else:
            entry = self.graphs.get(key)
            if entry is None:
                self._warm(*key)  # the step, eagerly: its errors are the step's own, as on the eager path
                try:
                    entry = self.graphs[key] = self._capture(*key)
                except Exception as error:  # noqa: BLE001 - a capture that fails: this and every later step eager
                    self.failed = f"{type(error).__name__}: {error}"
                    log.warning("CUDA graph capture failed (%s); decode steps run eagerly from now on", self.failed)
                    self._drop()
                    self.eager += 1
                    return None
                self.captures += 1
            replay, logits = entry
            replay()
            self.replays += 1
        cache.advance()
        return logits[:n].clone()

    def route(self) -> SlotRoute | None:
        """The holder's context as a SlotRoute over the padded factors, for an eager forward (a prefill: its
        adapters as two batched matmuls a projection, whatever the composition), or None where the context has no
        adapters, a mixture, or more than ROUTE_TOKENS tokens (each token gathers its padded factors, which past
        that costs more than the eager plans' one read of each adapter)."""
        context = self.lean.holder.current
        if context is None or isinstance(context, SlotRoute) or not context.routes or context.token_slots is None \
                or context.tokens > ROUTE_TOKENS:
            return None
        self._refresh()
        self.routed += 1
        return SlotRoute(torch.where(context.token_slots < 0, self.zero_slot, context.token_slots), self.factors)

    def _refresh(self) -> None:
        """Bring every projection's padded factors up to its banks; a reallocation makes the graphs stale, and so
        does a refresh that failed halfway (it may have reallocated some). While no bank was written, one
        comparison (a step's whole cost of this)."""
        generations = [bank.generation for bank in self.banks]
        if generations == self.generations:
            return
        self.generations = []
        try:
            grown = any([factors.refresh() for factors in self.factors.values()])  # a list: every one refreshed
        except BaseException:
            self._drop()
            raise
        if grown:
            self._drop()
        self.generations = generations

    def _drop(self) -> None:
        """Forget every graph, and their memory pool with them: a pool whose graphs are all gone is freed, and
        PyTorch refuses a capture into it after that (a new capture starts a new pool)."""
        self.graphs.clear()
        self.pool = None

    def _warm(self, rows: int, width: int, routes: bool) -> None:
        """Run the step once before its capture, on a side stream where CUDA runs (lazy initialisations, cuBLAS's
        workspace, stay out of the graph). It writes the same keys and values the replay writes next."""
        if not torch.cuda.is_available():
            self._step(rows, width, routes)
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step(rows, width, routes)
        torch.cuda.current_stream().wait_stream(side)

    def _capture(self, rows: int, width: int, routes: bool) -> tuple[Callable[[], None], torch.Tensor]:
        """The step captured as a graph (after `_warm`): its replay, and the logits tensor a replay writes."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = self._step(rows, width, routes)
        return graph.replay, logits

    def _step(self, rows: int, width: int, routes: bool) -> torch.Tensor:
        """The decode step over the static buffers' first `rows` rows -> logits (rows, vocab): what the graph holds."""
        lean, cache = self.lean, self.lean.cache
        columns = self.columns[:rows]
        shape = cache.keys.shape  # (layers, rows, kv_heads, capacity, head_dim)
        heads = torch.arange(shape[2], device=columns.device)
        batch = torch.arange(rows, device=columns.device)
        flat = ((batch[:, None] * shape[2] + heads[None, :]) * shape[3] + columns[:, None]).reshape(-1)  # (rows Hkv,)
        mask = (torch.arange(width, device=columns.device)[None, :] <= columns[:, None])[:, None, None]

        def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, values = cache.keys[index], cache.values[index]  # (rows, Hkv, capacity, D), contiguous
            keys.view(-1, shape[4]).index_copy_(0, flat, k[:, :, 0].reshape(-1, shape[4]))
            values.view(-1, shape[4]).index_copy_(0, flat, v[:, :, 0].reshape(-1, shape[4]))
            return lean._sdpa(q, keys[:rows, :, :width], values[:rows, :, :width], mask)

        holder = lean.holder
        saved = holder.current
        holder.current = SlotRoute(self.slots[:rows], self.factors) if routes else None
        try:
            hidden = lean._forward(self.tokens[:rows, None], columns[:, None], attend)
        finally:
            holder.current = saved
        return lean.logits(hidden[:, 0])
