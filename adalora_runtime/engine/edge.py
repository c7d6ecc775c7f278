"""Edge mode: one active adapter merged into the base weights, zero overhead per token.

Only the layers the active adapter touches (rank > 0) keep a copy of their original weight. Every merge
is computed from that copy, never from an already merged weight, so `deactivate()` restores the base
bit for bit and a swap recomputes only the layers either adapter touches.

An adapter with a classification head (seq-cls) also has its head tensors copied into the model's head
module (same shapes required: build the model with the adapter's num_labels); the model's own head tensors
are kept and restored on a swap to an adapter without a head and on `deactivate()`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adalora.adapter import Adapter, base_identity
from adalora.delta import delta_weight
from adalora.engine.errors import AdapterMismatch
from adalora.engine.slots import check_adapter
from adalora.layers import ADAPTABLE, linear_dims


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
        self.head_originals: dict[str, torch.Tensor] = {}
        """head parameter name -> the model's own tensor, for every head tensor the active adapter replaced."""

    @property
    def labels(self) -> list[str] | None:
        """The active adapter's label names (its head's output order), or None."""
        return None if self.active is None else self.active.labels

    def _check_head(self, adapter: Adapter) -> None:
        """AdapterMismatch unless every head tensor of `adapter` has a same-shaped parameter in the model."""
        params = dict(self.model.named_parameters())
        for key, tensor in adapter.head.items():
            if key not in params:
                raise AdapterMismatch(f"adapter head tensor {key!r} has no parameter in this model; activate it on a "
                                      f"model with that head (e.g. *ForSequenceClassification)")
            if params[key].shape != tensor.shape:
                raise AdapterMismatch(f"adapter head tensor {key!r} is {tuple(tensor.shape)}, the model's is "
                                      f"{tuple(params[key].shape)}; build the model with num_labels="
                                      f"{len(adapter.labels or []) or tensor.shape[0]}")

    def _swap_head(self, adapter: Adapter) -> None:
        """Copy the adapter's head in; restore the model's own tensors the adapter does not replace."""
        for key in [k for k in self.head_originals if k not in adapter.head]:
            self.model.get_parameter(key).copy_(self.head_originals.pop(key))
        for key, tensor in adapter.head.items():
            param = self.model.get_parameter(key)
            self.head_originals.setdefault(key, param.detach().clone())
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))

    @torch.no_grad()
    def activate(self, adapter: Adapter) -> list[str]:
        """Merge `adapter` (replacing the active one); returns the paths whose weights were rewritten."""
        check_adapter(adapter, self.identity, self.shapes)
        self._check_head(adapter)
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
        self._swap_head(adapter)
        self.active = adapter
        return touched

    @torch.no_grad()
    def deactivate(self) -> list[str]:
        """Restore every changed layer and head tensor from its kept original; returns the layer paths (empty
        if none active)."""
        restored = list(self.originals)
        for path, original in self.originals.items():
            self.model.get_submodule(path).weight.copy_(original)
        for key, original in self.head_originals.items():
            self.model.get_parameter(key).copy_(original)
        self.originals.clear()
        self.head_originals.clear()
        self.active = None
        return restored
