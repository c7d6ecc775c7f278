"""The one SVD-form delta formula: dW = P diag(lam) Q * scale, and its one fold into two factors.

Every consumer (training forward, compact export, merge tool, server slots, PEFT LoRA export) calls these
functions, so that the formula cannot drift between them. Shapes: P (out, r), lam (r,), Q (r, in).
"""

import torch


def delta_weight(P: torch.Tensor, lam: torch.Tensor, Q: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense update (out, in) = P diag(lam) Q * scale, in nn.Linear's weight layout."""
    return (P * lam) @ Q * scale  # (out, r) * (r,) @ (r, in) -> (out, in)


def apply_delta(x: torch.Tensor, P: torch.Tensor, lam: torch.Tensor, Q: torch.Tensor, scale: float) -> torch.Tensor:
    """x (..., in) -> (..., out): x @ (lam * scale * Q).T @ P.T, never forming the dense delta."""
    A, B = fold(P, lam, Q, scale)
    return (x @ A.T) @ B.T  # (..., r) -> (..., out)


def fold(P: torch.Tensor, lam: torch.Tensor, Q: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-factor form (A (r, in), B (out, r)) with B @ A = P diag(lam) Q * scale: lam and scale folded into A, in
    the factors' dtype (pass float32 factors for a float32 fold).

    What the training forward, the serving slots, the merge's low-rank sums and a LoRA reader (PEFT lora_A /
    lora_B at scale 1) take."""
    A = Q * (lam * scale)[:, None]  # (r, in)
    return A, P
