"""SVDLinear: a frozen linear layer plus the SVD-form update P diag(lam) Q * scale."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adalora.delta import apply_delta

ADAPTABLE = (nn.Linear, Conv1D)


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or transformers' Conv1D (weight stored (in, out))."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"cannot adapt {type(module).__name__}: only nn.Linear and Conv1D are supported")


class SVDLinear(nn.Module):
    """y = base(x) + dropout(x) @ (Q * lam).T @ P.T * scale.

    `scale` is fixed at construction (lora_alpha / init_r) and never changes when ranks are pruned,
    so a compact adapter reproduces the masked full-size one exactly.
    """

    def __init__(self, base: nn.Module, rank: int, scale: float, dropout: float = 0.0) -> None:
        super().__init__()
        in_f, out_f = linear_dims(base)
        self.base = base
        self.in_features, self.out_features = in_f, out_f
        self.scale = float(scale)
        factory = {"device": base.weight.device, "dtype": torch.float32}
        self.P = nn.Parameter(torch.zeros(out_f, rank, **factory))
        self.lam = nn.Parameter(torch.zeros(rank, **factory))
        self.Q = nn.Parameter(torch.zeros(rank, in_f, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def rank(self) -> int:
        return self.lam.shape[0]

    def reset(self, init: str, mode: str) -> None:
        """Initialize the factors: lam = 0 (adalora) so dW = 0, or LoRA's (A kaiming, B = 0, lam = 1)."""
        if self.rank == 0:
            return
        with torch.no_grad():
            if mode == "lora":
                nn.init.kaiming_uniform_(self.Q, a=math.sqrt(5))
                self.P.zero_()
                self.lam.fill_(1.0)
            elif init == "orthogonal":
                nn.init.orthogonal_(self.P)  # orthonormal columns when out >= r
                nn.init.orthogonal_(self.Q)  # orthonormal rows when in >= r
                self.lam.zero_()
            else:  # peft
                nn.init.normal_(self.P, std=0.02)
                nn.init.normal_(self.Q, std=0.02)
                self.lam.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.rank == 0:
            return y
        delta = apply_delta(self.dropout(x).to(self.P.dtype), self.P, self.lam, self.Q, self.scale)
        return y + delta.to(y.dtype)
