"""Batched multi-adapter apply: many SVD-form adapters of different ranks over one batch of tokens.

Reference semantics (every strategy computes exactly this, up to floating-point rounding):

    for each token i with group g[i] (-1 = base model only):
        delta[i] = x[i] @ A_g.T @ B_g.T            where A_g = Q_g * lam_g[:, None] * scale_g,  B_g = P_g

which is `apply_delta(x[i], P_g, lam_g, Q_g, scale_g)` of `adalora_runtime.delta`, with lambda and the
scale folded into the down factor A once, when the adapter is loaded. A group is one adapter, or a weighted
mixture whose factors are the concatenation of its members' (weight folded into A). Ranks differ per
group and may be 0; nothing is padded except inside the `padded` strategy, per call.

Shapes: x (N, in), groups (N,) long in [-1, G), factors[g].A (r_g, in), factors[g].B (out, r_g).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch


class Factors(NamedTuple):
    """One group's folded factors: A (r, in) = Q * lam * scale [* weight], B (out, r) = P."""

    A: torch.Tensor
    B: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def _empty_delta(x: torch.Tensor, factors: list[Factors]) -> torch.Tensor:
    return x.new_zeros(x.shape[0], factors[0].B.shape[0])  # (N, out)


def apply_group(x: torch.Tensor, groups: torch.Tensor, factors: list[Factors]) -> torch.Tensor:
    """Per distinct group: gather its rows, two small matmuls, index_add back. Cost ~ G launches."""
    delta = _empty_delta(x, factors)  # (N, out)
    for g, f in enumerate(factors):
        if f.rank == 0:
            continue
        rows = (groups == g).nonzero().squeeze(1)  # (n_g,)
        if rows.numel() == 0:
            continue
        h = x.index_select(0, rows) @ f.A.T  # (n_g, r_g)
        delta.index_add_(0, rows, h @ f.B.T)  # (n_g, out)
    return delta


def apply_packed(x: torch.Tensor, groups: torch.Tensor, factors: list[Factors]) -> torch.Tensor:
    """One matmul against all groups' A stacked, a per-token mask keeping each token's own columns, one
    matmul back against all B side by side. Cost ~ N * sum(r_g), a fixed number of launches."""
    A = torch.cat([f.A for f in factors], dim=0)  # (R, in), R = sum r_g
    B = torch.cat([f.B for f in factors], dim=1)  # (out, R)
    owner = torch.repeat_interleave(  # (R,): the group each column belongs to
        torch.arange(len(factors), device=x.device), torch.tensor([f.rank for f in factors], device=x.device))
    keep = groups[:, None] == owner[None, :]  # (N, R); a token of group -1 keeps nothing
    h = (x @ A.T) * keep.to(x.dtype)  # (N, R)
    return h @ B.T  # (N, out)


def apply_padded(x: torch.Tensor, groups: torch.Tensor, factors: list[Factors]) -> torch.Tensor:
    """Zero-pad every group to the batch's max rank, gather each token's factors, two bmm. Cost ~
    N * max_rank * (in + out) of gathered weights (what a BGMV kernel does without the gather)."""
    r_max = max(f.rank for f in factors)
    if r_max == 0:
        return _empty_delta(x, factors)
    in_f, out_f = x.shape[1], factors[0].B.shape[0]
    A = x.new_zeros(len(factors) + 1, r_max, in_f)  # (G + 1, r_max, in); the last group is all zeros
    B = x.new_zeros(len(factors) + 1, out_f, r_max)  # (G + 1, out, r_max)
    for g, f in enumerate(factors):
        A[g, : f.rank] = f.A
        B[g, :, : f.rank] = f.B
    index = torch.where(groups < 0, len(factors), groups)  # (N,): -1 -> the zero group
    h = torch.bmm(A[index], x[:, :, None])  # (N, r_max, in) @ (N, in, 1) -> (N, r_max, 1)
    return torch.bmm(B[index], h).squeeze(2)  # (N, out, r_max) @ (N, r_max, 1) -> (N, out)


STRATEGIES: dict[str, Callable[[torch.Tensor, torch.Tensor, list[Factors]], torch.Tensor]] = {
    "group": apply_group, "packed": apply_packed, "padded": apply_padded,
}


@dataclass(frozen=True)
class CostModel:
    """Relative cost of each strategy, in units of one token x one rank column of matmul work.

    - group:  G * launches_group * launch  +  N * sum_rank / G
      (each group only computes its own tokens; with N / G tokens per group on average)
    - packed: launches_packed * launch  +  N * sum_rank
      (every token multiplies every group's columns, masked afterwards)
    - padded: launches_padded * launch  +  N * max_rank * gather
      (each token reads its own padded factors; `gather` > 1 because that traffic is memory-bound)

    `launch` is the fixed cost of one kernel launch / python step expressed in the same units. Decode
    (few tokens) is launch-dominated and favours packed or padded; prefill (many tokens, several adapters)
    is work-dominated and favours group. The coefficients are first guesses for a later benchmark to
    calibrate; ties go to group, then packed.
    """

    launch: float = 2048.0
    launches_group: int = 4
    launches_packed: int = 5
    launches_padded: int = 6
    gather: float = 8.0

    def costs(self, tokens: int, distinct: int, sum_rank: int, max_rank: int) -> dict[str, float]:
        groups = max(distinct, 1)
        return {
            "group": groups * self.launches_group * self.launch + tokens * sum_rank / groups,
            "packed": self.launches_packed * self.launch + tokens * sum_rank,
            "padded": self.launches_padded * self.launch + tokens * max_rank * self.gather,
        }


DEFAULT_COST = CostModel()


def choose_strategy(tokens: int, distinct: int, sum_rank: int, max_rank: int, cost: CostModel = DEFAULT_COST) -> str:
    """The cheapest strategy under `cost` for N tokens, G distinct groups, their summed and max rank."""
    costs = cost.costs(tokens, distinct, sum_rank, max_rank)
    return min(costs, key=lambda name: (costs[name], list(STRATEGIES).index(name)))


def batched_apply(x: torch.Tensor, groups: torch.Tensor, factors: list[Factors], strategy: str = "auto",
                  cost: CostModel = DEFAULT_COST) -> torch.Tensor | None:
    """delta (N, out) of the reference semantics above, by the named strategy or the cost model's choice;
    None when no group has a nonzero rank (the caller adds nothing)."""
    ranks = [f.rank for f in factors]
    if sum(ranks) == 0:
        return None
    if strategy == "auto":
        strategy = choose_strategy(x.shape[0], len(factors), sum(ranks), max(ranks), cost)
    return STRATEGIES[strategy](x, groups, factors)
