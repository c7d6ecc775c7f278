"""MultiAdapterLinear: a frozen linear layer plus the batched apply of many adapters' slots.

The per-token routing comes from an explicit `BatchContext` held by a `ContextHolder` that the engine
owns and every wrapper of one model shares; with no context set, the layer is the base layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adalora_runtime.engine.apply import batched_apply
from adalora_runtime.engine.config import check_strategy
from adalora_runtime.engine.errors import BatchError, EngineError
from adalora_runtime.engine.slots import Route, SlotBank
from adalora_runtime.inject import _set_submodule
from adalora_runtime.layers import linear_dims


@dataclass(frozen=True)
class BatchContext:
    """Routing of one forward: token i (in the flattened (B * T) order of the layer inputs) runs
    routes[groups[i]], or the base model alone where groups[i] == -1."""

    groups: torch.Tensor
    """(N,) long on the model's device, values in [-1, len(routes))."""
    routes: tuple[Route, ...]
    strategy: str = "auto"
    """'auto' (the cost model decides per layer call) or one of 'group', 'packed', 'padded'."""

    def __post_init__(self) -> None:
        check_strategy(self.strategy)
        if self.groups.dim() != 1 or self.groups.dtype != torch.long:
            raise BatchError(f"groups must be a 1-D long tensor, got {self.groups.dtype} of shape {tuple(self.groups.shape)}")

    @property
    def tokens(self) -> int:
        return self.groups.shape[0]


class ContextHolder:
    """The one mutable cell the wrappers of a model read: the batch being run, or None (base only)."""

    def __init__(self) -> None:
        self.current: BatchContext | None = None


class MultiAdapterLinear(nn.Module):
    """y = base(x) + batched_apply(x, context.groups, [bank.route(r) for r in context.routes])."""

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
        factors = [self.bank.route(route) for route in context.routes]
        delta = batched_apply(flat, context.groups, factors, context.strategy)  # (N, out) or None
        if delta is None:
            return y
        return y + delta.view(y.shape).to(y.dtype)


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
