"""Adapter slots: per adapted layer, compact factors of each loaded adapter at its own rank.

Storage per (layer, slot) is `Factors(A, B)` with A (r, in) = Q * lam[:, None] * scale and B (out, r) = P,
where r is that adapter's kept rank in that layer (0 for a layer it does not adapt: zero-width tensors).
Lambda and scale are folded into A once, at load, in float32, then cast to the model's dtype and device;
nothing is padded to a common rank. Loading or unloading writes only the adapter's own slot. A bank also offers
every slot's factors stacked in slot order (`SlotBank.stacked`, built on first use after a write), which a
segment plan runs on as is; once built, each slot's factors are views of it, so the factors are held once.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from adalora import delta
from adalora.adapter import Adapter, base_mismatch
from adalora.engine.apply import Factors, Stack
from adalora.engine.errors import AdapterExists, AdapterMismatch, AdapterNotFound, SlotsFull

Route = tuple[tuple[int, float], ...]
"""What one group of tokens runs: (slot, weight) pairs; ((s, 1.0),) is adapter s alone."""


def fold(adapter: Adapter, path: str, in_f: int, out_f: int, device: torch.device, dtype: torch.dtype) -> Factors:
    """The adapter's factors of one module with lam and scale folded into A; rank 0 -> zero-width."""
    layer = adapter.layers.get(path)
    if layer is None:
        return Factors(torch.zeros(0, in_f, device=device, dtype=dtype), torch.zeros(out_f, 0, device=device, dtype=dtype))
    A, B = delta.fold(layer.P.float(), layer.lam.float(), layer.Q.float(), adapter.scale)  # (r, in), (out, r)
    return Factors(A.to(device=device, dtype=dtype).contiguous(), B.to(device=device, dtype=dtype).contiguous())


def check_adapter(adapter: Adapter, identity: dict, shapes: Mapping[str, tuple[int, int]]) -> None:
    """Raise AdapterMismatch unless `adapter` was trained on this base and adapts only served modules of
    the same (in, out); the message names the module."""
    problem = base_mismatch(adapter.base, identity)
    if problem:
        raise AdapterMismatch(f"{problem}, which this engine serves; load it into an engine over its own base model")
    for path, (in_f, out_f) in adapter.shapes.items():
        if path not in shapes:
            raise AdapterMismatch(f"adapter adapts module {path!r}, which this engine does not serve; create the "
                                  f"engine with target_modules that include {path.split('.')[-1]!r}")
        if tuple(shapes[path]) != (in_f, out_f):
            raise AdapterMismatch(f"module {path!r}: adapter expects (in, out)=({in_f}, {out_f}), the base has "
                                  f"{tuple(shapes[path])}")


class SlotBank:
    """One adapted layer's slots: `max_slots` entries of folded factors, each at its adapter's rank."""

    def __init__(self, in_features: int, out_features: int, max_slots: int, device: torch.device, dtype: torch.dtype):
        self.in_features, self.out_features = in_features, out_features
        self.device, self.dtype = device, dtype
        self._slots: list[Factors | None] = [None] * max_slots
        self._versions = [0] * max_slots
        """Bumped on every write of a slot, so a plan built from it can tell it is stale."""
        self.generation = 0
        """Bumped on every write of any slot: while it is unchanged, no plan of this bank can be stale (the one
        integer compare a layer call makes)."""
        self._stack: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        """(generation it was built at, A, BT, offsets) of `stacked`."""
        self._narrow: dict[torch.dtype, tuple[int, torch.Tensor, torch.Tensor]] = {}
        """dtype -> (generation, A, BT): `stacked` in another dtype than the bank's, a copy."""

    def set(self, slot: int, factors: Factors) -> None:
        self._slots[slot] = factors
        self._versions[slot] += 1
        self.generation += 1

    def clear(self, slot: int) -> None:
        self._slots[slot] = None
        self._versions[slot] += 1
        self.generation += 1

    def versions(self, slots: tuple[int, ...]) -> tuple[int, ...]:
        """The write count of each of `slots`: equal tuples mean their factors did not change."""
        return tuple(self._versions[s] for s in slots)

    def get(self, slot: int) -> Factors:
        factors = self._slots[slot]
        if factors is None:
            raise AdapterNotFound(f"slot {slot} is empty")
        return factors

    def rank(self, slot: int) -> int:
        return self.get(slot).rank

    @property
    def size(self) -> int:
        """Slots this bank has (the engine's max_slots)."""
        return len(self._slots)

    def factors(self, slot: int) -> Factors | None:
        """The slot's factors, or None while it is empty."""
        return self._slots[slot]

    def rank_of(self, slot: int) -> int:
        """The slot's rank here, 0 while it is empty."""
        factors = self._slots[slot]
        return 0 if factors is None else factors.rank

    def nbytes(self, slot: int) -> int:
        A, B = self.get(slot)
        return A.numel() * A.element_size() + B.numel() * B.element_size()

    def stacked(self, groups: torch.Tensor, dtype: torch.dtype | None = None) -> Stack:
        """Every slot's factors stacked in slot order, A (R, in) and BT (R, out), slot s's rows offsets[s]:
        offsets[s + 1] (none where a slot is empty or its adapter has rank 0 here), with `groups` (N,) each token's
        slot (-1: base). Built once per write of the bank; each slot's factors then become views of the stack (the
        bytes held once; a plan built from the old ones keeps them alive until it is dropped). `dtype` other than
        the bank's: a rounded copy of that stack (the lean path's bfloat16 factors), also built once per write."""
        if self._stack is None or self._stack[0] != self.generation:
            held = [f for f in self._slots if f is not None]
            if held:
                A = torch.cat([f.A for f in held]).contiguous()
                BT = torch.cat([f.B.T for f in held]).contiguous()
            else:
                A = torch.zeros(0, self.in_features, device=self.device, dtype=self.dtype)
                BT = torch.zeros(0, self.out_features, device=self.device, dtype=self.dtype)
            offsets = torch.tensor([0] + [0 if f is None else f.rank for f in self._slots]).cumsum(0)
            for slot, (r0, r1) in enumerate(zip(offsets.tolist(), offsets[1:].tolist())):
                if self._slots[slot] is not None:
                    self._slots[slot] = Factors(A[r0:r1], BT[r0:r1].T)
            self._stack = (self.generation, A, BT, offsets.to(self.device))
        _, A, BT, offsets = self._stack
        if dtype is not None and dtype != self.dtype:
            narrow = self._narrow.get(dtype)
            if narrow is None or narrow[0] != self.generation:
                narrow = self._narrow[dtype] = (self.generation, A.to(dtype), BT.to(dtype))
            _, A, BT = narrow
        return Stack(A, BT, offsets, groups)

    def route(self, route: Route) -> Factors:
        """Folded factors of one group: an adapter's own, or a mixture's concatenated with weights in A
        (sum_k w_k B_k A_k exactly, at rank sum_k r_k; zero-width when every member has rank 0 here)."""
        parts = [(w, self.get(s)) for s, w in route]
        parts = [(w, f) for w, f in parts if f.rank > 0] or parts[:1]
        if len(parts) == 1 and parts[0][0] == 1.0:
            return parts[0][1]
        A = torch.cat([f.A * w for w, f in parts], dim=0)  # (sum r, in)
        B = torch.cat([f.B for _, f in parts], dim=1)  # (out, sum r)
        return Factors(A, B)


class AdapterSlots:
    """Registry of loaded adapters over every served layer: id -> slot index, bytes per adapter."""

    def __init__(self, banks: dict[str, SlotBank], identity: dict, max_slots: int):
        self.banks = banks
        self.identity = identity
        self.max_slots = max_slots
        self._ids: dict[str, int] = {}
        self._adapters: dict[str, Adapter] = {}
        """The loaded host-side adapters (head, labels and task type for the serving layers above)."""
        self.version = 0
        """Bumped on every load and unload: a routing built from adapter ids is stale once it changes."""

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {path: (bank.in_features, bank.out_features) for path, bank in self.banks.items()}

    def load(self, adapter_id: str, adapter: Adapter) -> int:
        """Fold the adapter's factors into the lowest free slot of every bank; returns the slot index."""
        if adapter_id in self._ids:
            raise AdapterExists(f"adapter {adapter_id!r} is already loaded (slot {self._ids[adapter_id]}); "
                                f"unload it first or choose another id")
        free = [s for s in range(self.max_slots) if s not in self._ids.values()]
        if not free:
            raise SlotsFull(f"all {self.max_slots} adapter slots are in use ({sorted(self._ids)}); unload one or "
                            f"create the engine with a larger EngineConfig.max_slots")
        check_adapter(adapter, self.identity, self.shapes)
        slot = free[0]
        for path, bank in self.banks.items():
            bank.set(slot, fold(adapter, path, bank.in_features, bank.out_features, bank.device, bank.dtype))
        self._ids[adapter_id] = slot
        self._adapters[adapter_id] = adapter
        self.version += 1
        return slot

    def unload(self, adapter_id: str) -> None:
        slot = self.slot(adapter_id)
        for bank in self.banks.values():
            bank.clear(slot)
        del self._ids[adapter_id], self._adapters[adapter_id]
        self.version += 1

    def slot(self, adapter_id: str) -> int:
        if adapter_id not in self._ids:
            raise AdapterNotFound(f"adapter {adapter_id!r} is not loaded (loaded: {sorted(self._ids)})")
        return self._ids[adapter_id]

    def adapter(self, adapter_id: str) -> Adapter:
        self.slot(adapter_id)
        return self._adapters[adapter_id]

    def loaded(self) -> dict[str, int]:
        """adapter id -> slot index."""
        return dict(self._ids)

    def occupied(self, slot: int) -> bool:
        return slot in self._ids.values()

    def nbytes(self, adapter_id: str) -> int:
        """Device bytes the adapter's slot holds, over every layer."""
        slot = self.slot(adapter_id)
        return sum(bank.nbytes(slot) for bank in self.banks.values())
