"""Orthogonal regularizer of the SVD-form factors, added to the loss by the training loop."""

import torch

from adalora.inject import AdapterSet


def orth_penalty(adapters: AdapterSet) -> torch.Tensor:
    """Mean over adapted factor matrices of ||P^T P - I||_F and ||Q Q^T - I||_F (PEFT's averaging)."""
    terms = []
    for layer in adapters.layers.values():
        if layer.rank == 0:
            continue
        eye = torch.eye(layer.rank, device=layer.P.device, dtype=layer.P.dtype)
        terms.append(torch.linalg.matrix_norm(layer.P.T @ layer.P - eye))  # (r, r)
        terms.append(torch.linalg.matrix_norm(layer.Q @ layer.Q.T - eye))  # (r, r)
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean()
