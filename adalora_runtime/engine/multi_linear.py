"""MultiAdapterLinear: a frozen linear layer plus the batched apply of many adapters' slots.

The per-token routing comes from an explicit `BatchContext` held by a `ContextHolder` that the engine
owns and every wrapper of one model shares; with no context set, the layer is the base layer. The context
also keeps each layer's plan (its prepared factors for this batch), built on the layer's first call and
reused by later forwards with the same context until a slot of its routes is written (load / unload).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from adalora.config import is_int
from adalora.engine.apply import Plan, Routing, make_plan
from adalora.engine.cost import DEFAULT_COST, CostModel
from adalora.engine.config import check_strategy
from adalora.engine.errors import BatchError, EngineError
from adalora.engine.slots import Route, SlotBank
from adalora.inject import _set_submodule
from adalora.layers import linear_dims


@dataclass
class CachedPlan:
    """A layer's plan for one batch, with what tells whether it is still valid."""

    generation: int
    """The bank's write counter when this entry was last checked: equal now means no slot was written since."""
    versions: tuple
    """The versions of the context's slots when the plan was built: equal means the plan's factors are current."""
    plan: Plan | None
    """None: no route has a nonzero rank in this layer."""


@dataclass(frozen=True)
class BatchContext:
    """Routing of one forward: token i (in the flattened (B * T) order of the layer inputs) runs
    routes[groups[i]], or the base model alone where groups[i] == -1."""

    groups: torch.Tensor
    """(N,) long on the model's device, values in [-1, len(routes))."""
    routes: tuple[Route, ...]
    strategy: str = "auto"
    """'auto' (the cost model decides per layer) or one of 'group', 'packed', 'padded'."""
    cost: CostModel = DEFAULT_COST
    """The cost model 'auto' decides by."""
    calls: int = 1
    """Forwards this context is expected to serve: 'auto' shares each plan's build over them (a prefill runs
    once; a decode batch runs until a request joins or leaves)."""
    _plans: dict[SlotBank, CachedPlan] = field(default_factory=dict, init=False, repr=False, compare=False)
    """bank -> its plan for this batch and what it was built from; filled lazily by `plan`."""

    def __post_init__(self) -> None:
        check_strategy(self.strategy)
        if not is_int(self.calls, 1):
            raise BatchError(f"calls must be a positive integer (forwards the context serves), got {self.calls!r}")
        if self.groups.dim() != 1 or self.groups.dtype != torch.long:
            raise BatchError(f"groups must be a 1-D long tensor, got {self.groups.dtype} of shape {tuple(self.groups.shape)}")

    @property
    def tokens(self) -> int:
        return self.groups.shape[0]

    @cached_property
    def routing(self) -> Routing:
        return Routing(self.groups, len(self.routes))

    @cached_property
    def token_slots(self) -> torch.Tensor | None:
        """(N,) each token's slot (-1: base) where every route is one adapter at weight 1, so that a bank's stack
        serves the batch as is (`SlotBank.stacked`); None where a route is a mixture."""
        if not all(len(route) == 1 and route[0][1] == 1.0 for route in self.routes):
            return None
        lookup = torch.tensor([route[0][0] for route in self.routes] + [-1], device=self.groups.device)
        return lookup[self.groups]  # group -1 reads the last entry

    @cached_property
    def slots(self) -> tuple[int, ...]:
        """Every slot the routes read, once each."""
        return tuple(dict.fromkeys(s for route in self.routes for s, _ in route))

    def plan(self, bank: SlotBank) -> Plan | None:
        """The layer's prepared factors for this batch; rebuilt only when a slot of the routes was written
        since (an adapter loaded or unloaded there). None: no route has a nonzero rank in this layer."""
        cached = self._plans.get(bank)
        if cached is not None and cached.generation == bank.generation:  # no slot of this bank was written since
            return cached.plan
        versions = bank.versions(self.slots)
        if cached is None or cached.versions != versions:
            slots = self.token_slots
            stack = None if slots is None else lambda: bank.stacked(slots)
            cached = CachedPlan(bank.generation, versions,
                                make_plan(self.routing, [bank.route(r) for r in self.routes], self.strategy,
                                          self.cost, self.calls, stack))
            self._plans[bank] = cached
        cached.generation = bank.generation  # a write elsewhere in the bank leaves this plan as it was
        return cached.plan

    def built_plans(self) -> dict[SlotBank, Plan | None]:
        """bank -> the plan built for it so far (None: that layer adds nothing to this batch)."""
        return {bank: cached.plan for bank, cached in self._plans.items()}

    def chosen_strategies(self) -> Counter[str]:
        """How many layers run each strategy under the plans built so far (what 'auto' picked)."""
        return Counter(plan.strategy for plan in self.built_plans().values() if plan is not None)


class ContextHolder:
    """The one mutable cell the wrappers of a model read: the batch being run, or None (base only)."""

    def __init__(self) -> None:
        self.current: BatchContext | None = None


class MultiAdapterLinear(nn.Module):
    """y = base(x) + batched_apply(x, context.groups, [bank.route(r) for r in context.routes]), through the
    context's cached plan for this layer."""

    def __init__(self, base: nn.Module, bank: SlotBank, holder: ContextHolder) -> None:
        super().__init__()
        self.base = base
        self.bank = bank
        self.holder = holder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        context = self.holder.current
        if context is None or not context.routes:
            return y
        flat = x.reshape(-1, x.shape[-1])  # (N, in)
        if flat.shape[0] != context.tokens:
            raise BatchError(f"the batch context routes {context.tokens} tokens but this layer got input of shape "
                             f"{tuple(x.shape)} ({flat.shape[0]} tokens); build the context for this batch's shape")
        plan = context.plan(self.bank)
        if plan is None:
            return y
        if not y.is_contiguous():
            return y + plan(flat).view(y.shape).to(y.dtype)  # (N, out) -> y's shape
        add_delta(plan, self.bank, y.view(-1, y.shape[-1]), flat)
        return y


def add_delta(plan: Plan, bank: SlotBank, y: torch.Tensor, x: torch.Tensor) -> None:
    """y (N, out) += the plan's delta for x (N, in), in place: y may be a column slice of a wider output (the lean
    path's fused projections). In the bank's dtype without a (N, out) delta tensor; else through one, cast to y's."""
    if x.dtype == y.dtype == bank.dtype:
        plan.add_to(y, x)
    else:
        y += plan(x).to(y.dtype)


def install_multi_linear(model: nn.Module, banks: dict[str, SlotBank], holder: ContextHolder) -> dict[str, MultiAdapterLinear]:
    """Replace each module at a path of `banks` by a MultiAdapterLinear over it; returns them by path."""
    wrappers: dict[str, MultiAdapterLinear] = {}
    for path, bank in banks.items():
        base = model.get_submodule(path)
        if isinstance(base, MultiAdapterLinear):
            raise EngineError(f"{path} already serves adapters: create one engine per model")
        if linear_dims(base) != (bank.in_features, bank.out_features):
            raise EngineError(f"{path}: bank is (in, out)=({bank.in_features}, {bank.out_features}), module is {linear_dims(base)}")
        wrappers[path] = MultiAdapterLinear(base, bank, holder)
        _set_submodule(model, path, wrappers[path])
    return wrappers
