"""Batched multi-adapter apply: many SVD-form adapters of different ranks over one batch of tokens.

Reference semantics (every strategy computes exactly this, up to floating-point rounding):

    for each token i with group g[i] (-1 = base model only):
        delta[i] = x[i] @ A_g.T @ B_g.T            where A_g = Q_g * lam_g[:, None] * scale_g,  B_g = P_g

which is `apply_delta(x[i], P_g, lam_g, Q_g, scale_g)` of `adalora_runtime.delta`, with lambda and the
scale folded into the down factor A once, when the adapter is loaded. A group is one adapter, or a weighted
mixture whose factors are the concatenation of its members' (weight folded into A). Ranks differ per
group and may be 0; nothing is padded except inside the `padded` strategy's plan.

A plan is one layer's prepared tensors for one batch (the concatenated, masked or padded factors and the
token indices it needs), built by `make_plan` and then called on x as often as the batch's composition
stays the same (every decode step of an unchanged running batch).

Shapes: x (N, in), groups (N,) long in [-1, G), factors[g].A (r_g, in), factors[g].B (out, r_g).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, NamedTuple

import torch


class Factors(NamedTuple):
    """One group's folded factors: A (r, in) = Q * lam * scale [* weight], B (out, r) = P."""

    A: torch.Tensor
    B: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]


class Routing:
    """A batch's per-token groups and the indices derived from them once, shared by every layer's plan.

    Building a plan reads `rows` (one host sync for the whole batch) or `padded_index`; calling a plan
    reads neither, so a decode loop over an unchanged batch does no index work per layer call.
    """

    def __init__(self, groups: torch.Tensor, n_groups: int) -> None:
        self.groups = groups  # (N,) long in [-1, n_groups)
        self.n_groups = n_groups

    @property
    def tokens(self) -> int:
        return self.groups.shape[0]

    @cached_property
    def rows(self) -> tuple[torch.Tensor, ...]:
        """rows[g] (n_g,): the token indices of group g, ascending."""
        order = torch.argsort(self.groups, stable=True)  # (N,) base tokens (-1) first
        counts = torch.bincount(self.groups + 1, minlength=self.n_groups + 1).tolist()  # the one host sync
        return torch.split(order, counts)[1:]

    @cached_property
    def padded_index(self) -> torch.Tensor:
        """(N,): each token's group, with the base model (-1) mapped to the extra all-zero group n_groups."""
        return torch.where(self.groups < 0, self.n_groups, self.groups)


class GroupPlan:
    """Per distinct group: gather its rows, two small matmuls, index_add back. Cost ~ G launches."""

    strategy = "group"

    def __init__(self, routing: Routing, factors: list[Factors]) -> None:
        self.out_features = factors[0].B.shape[0]
        self.parts: list[tuple[torch.Tensor | None, Factors]] = []
        """(rows (n_g,) or None when the group holds every token, factors) of each group that adds anything."""
        for rows, f in zip(routing.rows, factors):
            if f.rank > 0 and rows.numel() > 0:
                self.parts.append((None if rows.numel() == routing.tokens else rows, f))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        delta = x.new_zeros(x.shape[0], self.out_features)  # (N, out)
        self.add_to(delta, x)
        return delta

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> None:
        """y (N, out) += delta, in place (x, y and the factors in one dtype)."""
        for rows, f in self.parts:
            if rows is None:  # the only group: no gather
                y.addmm_(x @ f.A.T, f.B.T)
            else:
                h = x.index_select(0, rows) @ f.A.T  # (n_g, r_g)
                y.index_add_(0, rows, h @ f.B.T)  # (n_g, out)


class PackedPlan:
    """One matmul against all groups' A stacked, a per-token mask keeping each token's own columns, one
    matmul back against all B side by side. Cost ~ N * sum(r_g), a fixed number of launches."""

    strategy = "packed"

    def __init__(self, routing: Routing, factors: list[Factors]) -> None:
        self.A = torch.cat([f.A for f in factors], dim=0)  # (R, in), R = sum r_g
        self.B = torch.cat([f.B for f in factors], dim=1)  # (out, R)
        owner = torch.cat([torch.full((f.rank,), g, dtype=torch.long) for g, f in enumerate(factors)])  # (R,)
        owner = owner.to(routing.groups.device)
        self.keep = (routing.groups[:, None] == owner[None, :]).to(self.A.dtype)  # (N, R); group -1 keeps nothing

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = (x @ self.A.T) * self.keep.to(x.dtype)  # (N, R)
        return h @ self.B.T  # (N, out)

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> None:
        """y (N, out) += delta, in place (x, y and the factors in one dtype): no delta tensor, one op fewer."""
        y.addmm_(torch.mm(x, self.A.T).mul_(self.keep), self.B.T)


class PaddedPlan:
    """Zero-pad every group to the batch's max rank, gather each token's factors, two bmm. Cost ~
    N * max_rank * (in + out) of gathered weights (what a BGMV kernel does without the gather)."""

    strategy = "padded"

    def __init__(self, routing: Routing, factors: list[Factors]) -> None:
        r_max = max(f.rank for f in factors)
        in_f, out_f = factors[0].A.shape[1], factors[0].B.shape[0]
        like = factors[0].A
        self.A = like.new_zeros(len(factors) + 1, r_max, in_f)  # (G + 1, r_max, in); the last group is all zeros
        self.B = like.new_zeros(len(factors) + 1, out_f, r_max)  # (G + 1, out, r_max)
        for g, f in enumerate(factors):
            self.A[g, : f.rank] = f.A
            self.B[g, :, : f.rank] = f.B
        self.index = routing.padded_index  # (N,)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.A.shape[1] == 0:
            return x.new_zeros(x.shape[0], self.B.shape[1])
        A, B = self.A.to(x.dtype), self.B.to(x.dtype)
        h = torch.bmm(A[self.index], x[:, :, None])  # (N, r_max, in) @ (N, in, 1) -> (N, r_max, 1)
        return torch.bmm(B[self.index], h).squeeze(2)  # (N, out, r_max) @ (N, r_max, 1) -> (N, out)

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> None:
        """y (N, out) += delta, in place."""
        y.add_(self(x))


Plan = GroupPlan | PackedPlan | PaddedPlan
PLANS: dict[str, type[GroupPlan] | type[PackedPlan] | type[PaddedPlan]] = {
    "group": GroupPlan, "packed": PackedPlan, "padded": PaddedPlan,
}


def _strategy(name: str) -> Callable[[torch.Tensor, torch.Tensor, list[Factors]], torch.Tensor]:
    """The one-shot form of a plan: build it for (groups, factors) and call it on x."""
    def apply(x: torch.Tensor, groups: torch.Tensor, factors: list[Factors]) -> torch.Tensor:
        return PLANS[name](Routing(groups, len(factors)), factors)(x)
    apply.__name__ = f"apply_{name}"
    apply.__doc__ = PLANS[name].__doc__
    return apply


apply_group, apply_packed, apply_padded = _strategy("group"), _strategy("packed"), _strategy("padded")


STRATEGIES: dict[str, Callable[[torch.Tensor, torch.Tensor, list[Factors]], torch.Tensor]] = {
    "group": apply_group, "packed": apply_packed, "padded": apply_padded,
}
"""Each strategy in one-shot form: (x, groups, factors) -> delta (N, out)."""


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


def make_plan(routing: Routing, factors: list[Factors], strategy: str = "auto",
              cost: CostModel = DEFAULT_COST) -> Plan | None:
    """The prepared tensors of one layer for one batch, by the named strategy or the cost model's choice;
    None when no group has a nonzero rank (the layer adds nothing). Call the plan on x (N, in)."""
    ranks = [f.rank for f in factors]
    if sum(ranks) == 0:
        return None
    if strategy == "auto":
        strategy = choose_strategy(routing.tokens, len(factors), sum(ranks), max(ranks), cost)
    return PLANS[strategy](routing, factors)


def batched_apply(x: torch.Tensor, groups: torch.Tensor, factors: list[Factors], strategy: str = "auto",
                  cost: CostModel = DEFAULT_COST) -> torch.Tensor | None:
    """delta (N, out) of the reference semantics above, by the named strategy or the cost model's choice;
    None when no group has a nonzero rank (the caller adds nothing). A one-shot `make_plan(...)(x)`."""
    plan = make_plan(Routing(groups, len(factors)), factors, strategy, cost)
    return None if plan is None else plan(x)
