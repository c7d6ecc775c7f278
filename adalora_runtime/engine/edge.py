"""Edge mode: one active adapter merged into the base weights, zero overhead per token.

Only the layers the active adapter touches (rank > 0) keep a copy of their original weight. Every merge
is computed from that copy, never from an already merged weight, so `deactivate()` restores the base
bit for bit and a swap recomputes only the layers either adapter touches.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adalora_runtime.adapter import Adapter, base_identity
from adalora_runtime.delta import delta_weight
from adalora_runtime.engine.slots import check_adapter
from adalora_runtime.layers import ADAPTABLE, linear_dims


def _merged(original: torch.Tensor, delta: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """original + delta in float32, back in the weight's dtype; Conv1D stores its weight (in, out)."""
    delta = delta.T if isinstance(module, Conv1D) else delta  # (out, in) or (in, out)
    return (original.float() + delta.to(original.device)).to(original.dtype)


class EdgeMerger:
    """Merges one adapter at a time into `model` in place."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.identity = base_identity(model)
        self.shapes = {name: linear_dims(m) for name, m in model.named_modules() if name and isinstance(m, ADAPTABLE)}
        self.active: Adapter | None = None
        self.originals: dict[str, torch.Tensor] = {}
        """path -> the base weight of every layer the active adapter changed."""

    @torch.no_grad()
    def activate(self, adapter: Adapter) -> list[str]:
        """Merge `adapter` (replacing the active one); returns the paths whose weights were rewritten."""
        check_adapter(adapter, self.identity, self.shapes)
        touched = list(dict.fromkeys([*self.originals, *adapter.layers]))
        for path in touched:
            weight = self.model.get_submodule(path).weight
            original = self.originals.pop(path, None)
            if original is None:
                original = weight.detach().clone()
            layer = adapter.layers.get(path)
            if layer is None:
                weight.copy_(original)
                continue
            delta = delta_weight(layer.P.float(), layer.lam.float(), layer.Q.float(), adapter.scale)  # (out, in)
            weight.copy_(_merged(original, delta, self.model.get_submodule(path)))
            self.originals[path] = original
        self.active = adapter
        return touched

    @torch.no_grad()
    def deactivate(self) -> list[str]:
        """Restore every changed layer from its kept original; returns their paths (empty if none active)."""
        restored = list(self.originals)
        for path, original in self.originals.items():
            self.model.get_submodule(path).weight.copy_(original)
        self.originals.clear()
        self.active = None
        return restored
