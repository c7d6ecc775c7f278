"""Dense merge methods on one layer's stacked updates (n, out, in): TIES, DARE, magnitude pruning.

Conventions follow the TIES (Yadav et al. 2023) and DARE (Yu et al. 2024) papers as PEFT implements
them: `density` is the fraction of entries kept; the majority sign is taken over the pruned (unweighted)
updates; entries that disagree with it or are zero do not count in the disjoint mean.
"""

from __future__ import annotations

import hashlib

import torch

MAJORITY = ("total", "frequency")


def layer_generator(seed: int, path: str) -> torch.Generator:
    """A generator seeded by (seed, module path): results do not depend on the order layers are merged."""
    digest = hashlib.sha256(f"{seed}:{path}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) entries of largest magnitude."""
    k = int(density * delta.numel())
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    mask[torch.topk(delta.abs().flatten(), k).indices] = True
    return mask.view_as(delta)


def random_mask(shape: torch.Size, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability `density` (DARE drops with p = 1 - density)."""
    return torch.rand(shape, generator=generator) < density


def majority_sign_agrees(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """(n, out, in) bool: where each input's sign equals the elected sign (sum of values or of signs)."""
    signs = stacked.sign()
    elected = stacked.sum(0) if method == "total" else signs.sum(0)
    majority = torch.where(elected >= 0, 1.0, -1.0)
    return signs == majority


def disjoint_mean(weighted: torch.Tensor, agrees: torch.Tensor) -> torch.Tensor:
    """Mean over inputs of the entries that agree with the majority sign (at least one counted)."""
    return (weighted * agrees).sum(0) / agrees.sum(0).clamp(min=1)


def _weights(weights: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(weights, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


def ties(stacked: torch.Tensor, weights: list[float], density: float, majority: str) -> torch.Tensor:
    """Trim each update to its top-density magnitudes, elect signs, disjoint weighted mean."""
    pruned = torch.stack([d * magnitude_mask(d, density) for d in stacked])
    return disjoint_mean(pruned * _weights(weights, pruned), majority_sign_agrees(pruned, majority))


def dare_prune(stacked: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Drop entries at random with p = 1 - density and rescale the survivors by 1 / (1 - p)."""
    return torch.stack([d * random_mask(d.shape, density, generator) / density for d in stacked])


def dare_linear(stacked: torch.Tensor, weights: list[float], density: float, generator: torch.Generator) -> torch.Tensor:
    pruned = dare_prune(stacked, density, generator)
    return (pruned * _weights(weights, pruned)).sum(0)


def dare_ties(stacked: torch.Tensor, weights: list[float], density: float, majority: str,
              generator: torch.Generator) -> torch.Tensor:
    pruned = dare_prune(stacked, density, generator)
    return disjoint_mean(pruned * _weights(weights, pruned), majority_sign_agrees(pruned, majority))


def magnitude_prune(stacked: torch.Tensor, weights: list[float], density: float) -> torch.Tensor:
    pruned = torch.stack([d * magnitude_mask(d, density) for d in stacked])
    return (pruned * _weights(weights, pruned)).sum(0)
