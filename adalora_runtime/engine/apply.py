"""Batched multi-adapter apply: many SVD-form adapters of different ranks over one batch of tokens.

Reference semantics (every strategy computes exactly this, up to floating-point rounding):

    for each token i with group g[i] (-1 = base model only):
        delta[i] = x[i] @ A_g.T @ B_g.T            where A_g = Q_g * lam_g[:, None] * scale_g,  B_g = P_g

which is `apply_delta(x[i], P_g, lam_g, Q_g, scale_g)` of `adalora.delta`, with lambda and the
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

from adalora.config import ConfigError


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
        # stored transposed and contiguous: x @ AT and h @ BT run as plain row-major matmuls (faster on the
        # CPU than the transposed views of A and B)
        self.AT = torch.cat([f.A.T for f in factors], dim=1)  # (in, R), R = sum r_g
        self.BT = torch.cat([f.B.T for f in factors], dim=0)  # (R, out)
        owner = torch.cat([torch.full((f.rank,), g, dtype=torch.long) for g, f in enumerate(factors)])  # (R,)
        owner = owner.to(routing.groups.device)
        self.keep = (routing.groups[:, None] == owner[None, :]).to(self.AT.dtype)  # (N, R); group -1 keeps nothing

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = (x @ self.AT) * self.keep.to(x.dtype)  # (N, R)
        return h @ self.BT  # (N, out)

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> None:
        """y (N, out) += delta, in place (x, y and the factors in one dtype): no delta tensor, one op fewer."""
        y.addmm_(torch.mm(x, self.AT).mul_(self.keep), self.BT)


class PaddedPlan:
    """Each token's own factors, zero-padded to the batch's max rank and gathered once when the plan is
    built: AT (N, in, r_max) and BT (N, r_max, out) (tokens on the base model get zeros). A call is then two
    batched matmuls, what a BGMV kernel computes, with the gather paid once per batch composition instead
    of per call. Cost ~ N * r_max * (in + out) in two launches. Past `pregather_bytes` of gathered factors
    (a long prefill forced onto this strategy) the plan keeps one padded copy per group and gathers on
    every call instead, so its memory stays G * r_max * (in + out)."""

    strategy = "padded"
    pregather_bytes = 4 << 20
    """Per layer: the most gathered factor bytes a plan holds (decode batches of up to ~16 on a small model)."""

    def __init__(self, routing: Routing, factors: list[Factors]) -> None:
        r_max = max(f.rank for f in factors)
        in_f, out_f = factors[0].A.shape[1], factors[0].B.shape[0]
        like = factors[0].A
        AT = like.new_zeros(len(factors) + 1, in_f, r_max)  # (G + 1, in, r_max); the last group is all zeros
        BT = like.new_zeros(len(factors) + 1, r_max, out_f)  # (G + 1, r_max, out)
        for g, f in enumerate(factors):
            AT[g, :, : f.rank] = f.A.T
            BT[g, : f.rank] = f.B.T
        self.index: torch.Tensor | None = routing.padded_index  # (N,) each token's row of AT / BT
        if self.pregathers(routing.tokens, r_max, in_f, out_f, like.element_size()):
            AT, BT, self.index = AT[self.index], BT[self.index], None  # (N, in, r_max), (N, r_max, out)
        self.AT, self.BT = AT, BT

    @classmethod
    def pregathers(cls, tokens: int, max_rank: int, in_f: int, out_f: int, element_size: int) -> bool:
        """Whether a plan of this size gathers every token's factors once (else on every call)."""
        return tokens * max_rank * (in_f + out_f) * element_size <= cls.pregather_bytes

    def _token_factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        AT, BT = (self.AT, self.BT) if self.index is None else (self.AT[self.index], self.BT[self.index])
        return AT.to(dtype), BT.to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        AT, BT = self._token_factors(x.dtype)
        return torch.bmm(torch.bmm(x[:, None, :], AT), BT).squeeze(1)  # (N, 1, r_max) -> (N, out)

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> None:
        """y (N, out) += delta, in place (x, y and the factors in one dtype)."""
        AT, BT = self._token_factors(x.dtype)
        y[:, None, :].baddbmm_(torch.bmm(x[:, None, :], AT), BT)


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


COST_PARAMETERS = ("launch", "gather", "bmm", "build_group", "build_column")


def cost_terms(strategy: str, tokens: int, distinct: int, sum_rank: int, max_rank: int,
               build: bool = False) -> dict[str, float]:
    """The coefficients of one call of a strategy's plan (or, with `build`, of building it): its cost under a
    CostModel is terms['work'] + the sum of getattr(model, name) * terms[name] over the other names. The one
    place of CostModel's formulas (written out in its docstring), shared with `engine.calibrate`'s fit."""
    groups = max(distinct, 1)
    if build:
        if strategy == "group":
            return {}
        columns = sum_rank if strategy == "packed" else (groups + 1 + tokens) * max_rank
        return {"build_group": groups, "build_column": columns}
    if strategy == "group":
        if groups == 1:
            return {"launch": 2, "work": tokens * sum_rank}
        return {"launch": 4 * groups, "work": tokens * sum_rank / groups, "gather": tokens}
    if strategy == "packed":
        return {"launch": 3, "work": tokens * sum_rank}
    return {"launch": 2, "bmm": tokens * max_rank}


@dataclass(frozen=True)
class CostModel:
    """Relative cost of each strategy for one layer over a plan's life, in units of one token x one rank
    column of matmul work (a layer's width scales every term about alike, so it drops out of the comparison).

    One call of a plan (N tokens, G groups, their summed rank S and max rank M):
    - group:  launch * (2 if G == 1 else 4 * G)  +  N * (S / G  +  (gather if G > 1 else 0))
      (per group: gather its rows, two matmuls, scatter back; a single group needs no gather or scatter;
      each token multiplies only its own group's columns, but moving its row in and out costs `gather`)
    - packed: 3 * launch  +  N * S
      (every token multiplies every group's columns, masked between the two matmuls)
    - padded: 2 * launch  +  bmm * N * M, only where the plan pre-gathers (`PaddedPlan.pregathers`; every
      token multiplies its own factors padded to the max rank; `bmm` > 1 because many small batched
      matrix-vector products run at a lower rate than one matmul)

    Building a plan, paid once per batch composition (a decode batch keeps its plans until a request joins
    or leaves):
    - group:  nothing (its row indices are the batch's, shared by every layer)
    - packed: build_group * G  +  build_column * S  (concatenate every group's factors once)
    - padded: build_group * G  +  build_column * (G + 1 + N) * M  (pad each group to M, then gather a copy
      per token)

    A plan expected to serve `calls` forwards costs call + build / calls per forward: a prefill (1 call)
    or a decode batch that changes at every step pays the whole build, a batch that decodes 64 tokens
    unchanged hardly any. So group, which builds nothing, wins a single forward; packed and padded, whose
    calls are cheaper over several adapters, win once a composition lives a few steps, padded (the cheapest
    call over many adapters) from about 8 of them. `launch` is the fixed cost of one operator call
    (dispatch, kernel launch) in the same units. The defaults are the fit that `benchmarks/engine_apply.py`
    printed on SmolLM2-135M's layer shapes, float32, 2 threads of a 2-core CPU (docs/BENCHMARKS.md), to two
    digits; there a plan's build cost is all per-group work (build_column fitted to 0). Ties go to group,
    then packed. Another device wants its own numbers: rerun that benchmark and pass the CostModel it prints.
    """

    launch: float = 150.0
    gather: float = 47.0
    bmm: float = 4.9
    build_group: float = 1300.0
    build_column: float = 0.0

    def __post_init__(self) -> None:
        for name in COST_PARAMETERS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ConfigError(f"CostModel.{name} must be a finite number >= 0, got {value!r}")

    def cost(self, terms: dict[str, float]) -> float:
        """The cost of `cost_terms(...)` under this model."""
        return terms.get("work", 0.0) + sum(getattr(self, name) * c for name, c in terms.items() if name != "work")

    def costs(self, tokens: int, distinct: int, sum_rank: int, max_rank: int, padded: bool = True,
              calls: int = 1) -> dict[str, float]:
        """Cost per forward of each strategy over a plan that serves `calls` forwards (its build shared);
        `padded` False leaves padded out (its plan would not pre-gather)."""
        if isinstance(calls, bool) or not isinstance(calls, int) or calls < 1:
            raise ValueError(f"calls must be a positive integer, got {calls!r}")
        return {name: (self.cost(cost_terms(name, tokens, distinct, sum_rank, max_rank))
                       + self.cost(cost_terms(name, tokens, distinct, sum_rank, max_rank, build=True)) / calls)
                for name in PLANS if padded or name != "padded"}


DEFAULT_COST = CostModel()


def choose_strategy(tokens: int, distinct: int, sum_rank: int, max_rank: int, cost: CostModel = DEFAULT_COST,
                    padded: bool = True, calls: int = 1) -> str:
    """The cheapest strategy under `cost` for N tokens, G distinct groups, their summed and max rank, over a
    plan expected to serve `calls` forwards; `padded` False when a padded plan would not pre-gather."""
    costs = cost.costs(tokens, distinct, sum_rank, max_rank, padded, calls)
    return min(costs, key=lambda name: (costs[name], list(STRATEGIES).index(name)))


def make_plan(routing: Routing, factors: list[Factors], strategy: str = "auto",
              cost: CostModel = DEFAULT_COST, calls: int = 1) -> Plan | None:
    """The prepared tensors of one layer for one batch, by the named strategy or the cost model's choice for a
    plan expected to serve `calls` forwards; None when no group has a nonzero rank (the layer adds nothing).
    Call the plan on x (N, in)."""
    ranks = [f.rank for f in factors]
    if sum(ranks) == 0:
        return None
    if strategy == "auto":
        A = factors[0].A
        padded = PaddedPlan.pregathers(routing.tokens, max(ranks), A.shape[1], factors[0].B.shape[0], A.element_size())
        strategy = choose_strategy(routing.tokens, len(factors), sum(ranks), max(ranks), cost, padded, calls)
    return PLANS[strategy](routing, factors)


def batched_apply(x: torch.Tensor, groups: torch.Tensor, factors: list[Factors], strategy: str = "auto",
                  cost: CostModel = DEFAULT_COST) -> torch.Tensor | None:
    """delta (N, out) of the reference semantics above, by the named strategy or the cost model's choice;
    None when no group has a nonzero rank (the caller adds nothing). A one-shot `make_plan(...)(x)`."""
    plan = make_plan(Routing(groups, len(factors)), factors, strategy, cost)
    return None if plan is None else plan(x)
