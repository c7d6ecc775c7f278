"""AdapterEngine: one frozen base model serving many loaded adapters in one batch.

    engine = AdapterEngine(model, EngineConfig(max_slots=8))
    engine.load("support", adapter)
    with engine.batch(engine.context(["support", None, {"support": 0.5, "legal": 0.5}], tokens_per_row=T)):
        logits = model(input_ids).logits  # row 0 with 'support', row 1 the base, row 2 a 50/50 mix
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from adalora.adapter import Adapter, base_identity
from adalora.config import is_number
from adalora.engine.config import EngineConfig
from adalora.engine.errors import BatchError, EngineError
from adalora.engine.heads import Head, HeadBank
from adalora.engine.multi_linear import BatchContext, ContextHolder, MultiAdapterLinear, install_multi_linear
from adalora.engine.slots import AdapterSlots, Route, SlotBank
from adalora.inject import resolve_targets
from adalora.layers import linear_dims

Selection = str | Mapping[str, float] | None
"""What one row runs: an adapter id, a weighted mixture {id: weight}, or None for the base model."""
MAX_MIX_WEIGHT = 100.0
"""Largest |weight| of one adapter in a mixture: beyond it the mixed delta overflows (a mix is a blend of tasks)."""


class AdapterEngine:
    """Installs MultiAdapterLinear into `model` (in place, once) and owns its slots and batch context."""

    def __init__(self, model: nn.Module, config: EngineConfig = EngineConfig()) -> None:
        if any(isinstance(m, MultiAdapterLinear) for m in model.modules()):
            raise EngineError("this model already serves adapters: create one engine per model (over a fresh copy)")
        for p in model.parameters():
            p.requires_grad_(False)
        self.model, self.config = model, config
        self.device = next(model.parameters()).device
        banks = {path: self._bank(model.get_submodule(path)) for path in resolve_targets(model, config.target_modules)}
        self.slots = AdapterSlots(banks, base_identity(model), config.max_slots)
        hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
        self.heads = HeadBank(config.max_slots, hidden_size, self.device, next(model.parameters()).dtype)
        self.holder = ContextHolder()
        self.layers = install_multi_linear(model, banks, self.holder)

    def _bank(self, module: nn.Module) -> SlotBank:
        """Slots on the module's own device and in its weight's dtype."""
        return SlotBank(*linear_dims(module), self.config.max_slots, module.weight.device, module.weight.dtype)

    def load(self, adapter_id: str, adapter: Adapter) -> int:
        """Fold `adapter` into a free slot of every served layer, and keep its classification head (if any)
        beside that slot; returns the slot index. A head that cannot be served loads nothing."""
        head = self.heads.prepare(adapter)
        slot = self.slots.load(adapter_id, adapter)
        self.heads.set(slot, head)
        return slot

    def unload(self, adapter_id: str) -> None:
        """Free the adapter's slot and drop its head; other slots are not touched."""
        slot = self.slots.slot(adapter_id)
        self.slots.unload(adapter_id)
        self.heads.clear(slot)

    def head(self, adapter_id: str) -> Head | None:
        """The loaded adapter's classification head on the model's device, or None when it has none."""
        return self.heads.get(self.slots.slot(adapter_id))

    def footprint(self, adapter: Adapter) -> int:
        """Device bytes `adapter` will hold once loaded (nbytes after load): its folded factors at the kept ranks
        of the served layers it adapts, plus its head, all in the slots' dtype. Raises nothing: check first."""
        itemsize = self.heads.dtype.itemsize
        factors = sum(layer.rank * (self.slots.banks[path].in_features + self.slots.banks[path].out_features)
                      for path, layer in adapter.layers.items() if path in self.slots.banks)
        return (factors + sum(t.numel() for t in adapter.head.values())) * itemsize

    def nbytes(self, adapter_id: str) -> int:
        """Device bytes the adapter holds: its factors in every layer plus its head."""
        return self.slots.nbytes(adapter_id) + self.heads.nbytes(self.slots.slot(adapter_id))

    def _route(self, request: Selection, row: int) -> Route | None:
        if request is None:
            return None
        if isinstance(request, str):
            return ((self.slots.slot(request), 1.0),)
        if not request:
            raise BatchError(f"row {row}: an empty mixture; name at least one adapter id, or None for the base model")
        for adapter_id, weight in request.items():
            if not is_number(weight, -MAX_MIX_WEIGHT, MAX_MIX_WEIGHT):
                raise BatchError(f"row {row}: weight of {adapter_id!r} must be a finite number, got {weight!r} "
                                 f"(|weight| <= {MAX_MIX_WEIGHT:g})")
        return tuple(sorted((self.slots.slot(a), float(w)) for a, w in request.items()))

    def check(self, request: Selection) -> None:
        """Raise AdapterNotFound or BatchError unless `request` could run now (what context() checks for each
        row), building nothing on the device."""
        self._route(request, 0)

    def context(self, requests: Sequence[Selection], tokens_per_row: int | Sequence[int], strategy: str = "auto",
                calls: int = 1) -> BatchContext:
        """Routing for a batch in which row b runs requests[b] on each of its tokens, in row order, over `calls`
        expected forwards (see BatchContext.calls): `tokens_per_row` tokens every row (a (rows, T) batch), or
        tokens_per_row[b] for row b (rows packed one after the other, as the lean path's prefill runs them)."""
        counts = [tokens_per_row] * len(requests) if isinstance(tokens_per_row, int) else list(tokens_per_row)
        if len(counts) != len(requests) or any(not isinstance(c, int) or c < 1 for c in counts):
            raise BatchError(f"tokens_per_row must be at least 1 for each of the {len(requests)} rows, "
                             f"got {tokens_per_row}")
        routes: dict[Route, int] = {}
        row_groups = []
        for row, request in enumerate(requests):
            route = self._route(request, row)
            row_groups.append(-1 if route is None else routes.setdefault(route, len(routes)))
        groups = torch.tensor(row_groups, dtype=torch.long, device=self.device).repeat_interleave(
            torch.tensor(counts, dtype=torch.long, device=self.device))
        return BatchContext(groups=groups, routes=tuple(routes), strategy=strategy, cost=self.config.cost,
                            calls=calls)

    def context_from_slots(self, slots: torch.Tensor, strategy: str = "auto") -> BatchContext:
        """Routing from raw per-token slot indices (any shape, flattened in order; -1 = base model)."""
        flat = slots.reshape(-1).to(device=self.device, dtype=torch.long)
        if flat.numel() and int(flat.min()) < -1:
            raise BatchError(f"slot indices must be -1 (base) or a loaded slot, got {int(flat.min())}")
        present = [int(s) for s in torch.unique(flat) if int(s) >= 0]
        for s in present:
            if s >= self.slots.max_slots or not self.slots.occupied(s):
                raise BatchError(f"token slot index {s} holds no adapter (loaded: {self.slots.loaded()}); use -1 for the base")
        lookup = torch.full((self.slots.max_slots + 1,), -1, dtype=torch.long, device=self.device)
        for g, s in enumerate(present):
            lookup[s] = g
        groups = lookup[flat]  # -1 indexes the last entry, which stays -1
        return BatchContext(groups=groups, routes=tuple(((s, 1.0),) for s in present), strategy=strategy,
                            cost=self.config.cost)

    @contextmanager
    def batch(self, context: BatchContext) -> Iterator[BatchContext]:
        """Run the model's forwards inside this block with `context`'s routing; base only outside it."""
        if self.holder.current is not None:
            raise BatchError("a batch context is already active on this engine; finish that forward first")
        self.holder.current = context
        try:
            yield context
        finally:
            self.holder.current = None
