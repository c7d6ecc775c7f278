"""Per-slot classification heads: each loaded seq-cls adapter keeps its own linear head and label names.

A head lives beside the adapter's slot, independent of the model's own head module, so adapters with
different label sets (different num_labels) share one base: logits = pooled @ weight.T + bias, with
weight (num_labels, hidden) cast once at load to the model's device and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adalora.adapter import Adapter
from adalora.engine.errors import AdapterMismatch
from adalora.inject import HEAD_NAMES


@dataclass(frozen=True)
class Head:
    """One adapter's classifier: a linear map from the pooled hidden state to one logit per label."""

    name: str
    """The head module it was trained as ('classifier' or 'score')."""
    weight: torch.Tensor
    """(num_labels, hidden)"""
    bias: torch.Tensor | None
    """(num_labels,) or None (decoder 'score' heads have no bias)."""
    labels: tuple[str, ...]

    def __call__(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.linear(pooled, self.weight, self.bias)  # (B, hidden) -> (B, num_labels)

    @property
    def nbytes(self) -> int:
        tensors = [self.weight] if self.bias is None else [self.weight, self.bias]
        return sum(t.numel() * t.element_size() for t in tensors)

    def same_as(self, other: Head) -> bool:
        """Bit-identical parameters and labels (a mixture may only share one head)."""
        if self.bias is None or other.bias is None:
            same_bias = self.bias is None and other.bias is None
        else:
            same_bias = self.bias.shape == other.bias.shape and torch.equal(self.bias, other.bias)
        return (self.name == other.name and self.labels == other.labels and same_bias
                and self.weight.shape == other.weight.shape and torch.equal(self.weight, other.weight))


def parse_head(adapter: Adapter, hidden_size: int | None, device: torch.device, dtype: torch.dtype) -> Head | None:
    """The adapter's head on `device` in `dtype`; None when it carries none. AdapterMismatch for a head that is
    not one linear layer named in HEAD_NAMES, of another hidden size, or whose labels do not match its rows."""
    if not adapter.head:
        return None
    names = {key.rpartition(".")[0] for key in adapter.head}
    if len(names) != 1 or next(iter(names)) not in HEAD_NAMES:
        raise AdapterMismatch(f"adapter head tensors {sorted(adapter.head)} are not one linear layer named one of "
                              f"{HEAD_NAMES} ('<name>.weight' and optionally '<name>.bias'); the engine serves only "
                              f"single linear heads (e.g. BERT's classifier, a decoder's score)")
    name = names.pop()
    extra = set(adapter.head) - {f"{name}.weight", f"{name}.bias"}
    weight = adapter.head.get(f"{name}.weight")
    if extra or weight is None or weight.dim() != 2:
        raise AdapterMismatch(f"adapter head {name!r} must hold a 2-D '{name}.weight' and optionally '{name}.bias', "
                              f"got {sorted(adapter.head)}")
    bias = adapter.head.get(f"{name}.bias")
    num_labels, in_features = weight.shape
    if hidden_size is not None and in_features != hidden_size:
        raise AdapterMismatch(f"adapter head {name!r} takes hidden size {in_features}, this base has {hidden_size}")
    if bias is not None and tuple(bias.shape) != (num_labels,):
        raise AdapterMismatch(f"adapter head bias {name!r}.bias has shape {tuple(bias.shape)}, expected ({num_labels},)")
    labels = tuple(adapter.labels) if adapter.labels else tuple(f"LABEL_{i}" for i in range(num_labels))
    if len(labels) != num_labels:
        raise AdapterMismatch(f"adapter names {len(labels)} labels {list(labels)} but its head {name!r} has "
                              f"{num_labels} outputs; fix the adapter's labels")
    to_device = dict(device=device, dtype=dtype)
    return Head(name=name, weight=weight.to(**to_device).contiguous(),
                bias=None if bias is None else bias.to(**to_device).contiguous(), labels=labels)


class HeadBank:
    """slot -> Head (or None for an adapter without one), written only by its own slot's load and unload."""

    def __init__(self, max_slots: int, hidden_size: int | None, device: torch.device, dtype: torch.dtype) -> None:
        self.hidden_size, self.device, self.dtype = hidden_size, device, dtype
        self._heads: list[Head | None] = [None] * max_slots

    def prepare(self, adapter: Adapter) -> Head | None:
        """Validate and place the adapter's head; call before the slot is written, so a bad head loads nothing."""
        return parse_head(adapter, self.hidden_size, self.device, self.dtype)

    def set(self, slot: int, head: Head | None) -> None:
        self._heads[slot] = head

    def clear(self, slot: int) -> None:
        self._heads[slot] = None

    def get(self, slot: int) -> Head | None:
        return self._heads[slot]

    def nbytes(self, slot: int) -> int:
        head = self._heads[slot]
        return 0 if head is None else head.nbytes
