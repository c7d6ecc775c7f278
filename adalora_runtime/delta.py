"""The one SVD-form delta formula: dW = P diag(lam) Q * scale.

Every consumer (training forward, compact export, merge tool, server) calls these two functions,
so that the formula cannot drift between them. Shapes: P (out, r), lam (r,), Q (r, in).
"""

import torch


def delta_weight(P: torch.Tensor, lam: torch.Tensor, Q: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense update (out, in) = P diag(lam) Q * scale, in nn.Linear's weight layout."""
    return (P * lam) @ Q * scale  # (out, r) * (r,) @ (r, in) -> (out, in)


def apply_delta(x: torch.Tensor, P: torch.Tensor, lam: torch.Tensor, Q: torch.Tensor, scale: float) -> torch.Tensor:
    """x (..., in) -> (..., out): x @ (Q * lam).T @ P.T * scale, never forming the dense delta."""
    return (x @ (Q * lam[:, None]).T) @ P.T * scale  # (..., r) -> (..., out)


def fold(P: torch.Tensor, lam: torch.Tensor, Q: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-factor form (A (r, in), B (out, r)) with B @ A = P diag(lam) Q * scale: lam and scale folded into A.

    What a LoRA reader (PEFT lora_A / lora_B at scale 1) and the serving slots take."""
    A = Q.float() * (lam.float() * scale)[:, None]  # (r, in)
    return A, P
