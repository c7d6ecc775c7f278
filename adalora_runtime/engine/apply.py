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

from collections.abc import Callable
from functools import cached_property
from typing import NamedTuple, Protocol

import torch

from adalora.engine import native
from adalora.engine.cost import DEFAULT_COST, STRATEGY_TERMS, CostModel, choose_strategy


class Factors(NamedTuple):
    """One group's folded factors: A (r, in) = Q * lam * scale [* weight], B (out, r) = P."""

    A: torch.Tensor
    B: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]


class Stack(NamedTuple):
    """One bank's factors of every slot stacked in slot order (`SlotBank.stacked`), with each token's slot: what a
    segment plan runs on as is when every group of a batch is one adapter at weight 1, stacking nothing itself."""

    A: torch.Tensor
    """(R, in): slot s's rows are offsets[s]:offsets[s + 1] (none for an empty slot or a rank-0 layer)."""
    BT: torch.Tensor
    """(R, out), the same rows."""
    offsets: torch.Tensor
    """(slots + 1,) long."""
    groups: torch.Tensor
    """(N,) long: each token's slot, -1 on the base model."""


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


def gathered_add_(y: torch.Tensor, x: torch.Tensor, AT: torch.Tensor, BT: torch.Tensor) -> None:
    """y (N, out) += (x[i] @ AT[i]) @ BT[i] for each token i, in place: AT (N, in, r) and BT (N, r, out), each
    token's own factors zero-padded to one rank r (what a BGMV kernel computes), two batched matmuls."""
    y[:, None].baddbmm_(torch.bmm(x[:, None], AT), BT)


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
        gathered_add_(y, x, *self._token_factors(x.dtype))


class SegmentPlan:
    """Every group's factors stacked once, A (R, in) and BT (R, out), with each group's row offsets; a call is one
    native kernel (`engine.native.segment_lora_add_`) in which each token multiplies its own group's rows only:
    nothing padded or masked, one launch per layer. Cost ~ N * S / G in one launch. Given a bank's `Stack` (every
    group one adapter), the plan runs on it as is, tokens routed by slot, and builds nothing. The kernel runs on a
    CPU in float32; elsewhere the plan runs each group's rows as two matmuls over its slice of the stack (group's
    work, and `make_plan`'s auto never picks it there)."""

    strategy = "segment"

    def __init__(self, routing: Routing, factors: list[Factors], stack: Stack | None = None) -> None:
        self.routing = routing
        self.stacked = stack is not None
        """Whether the plan runs on its bank's stack (groups are then each token's slot)."""
        if stack is not None:
            self.A, self.BT, self.offsets, self.groups = stack
            self.native = True  # make_plan passes a stack only where the kernel runs
        else:
            self.A = torch.cat([f.A for f in factors]).contiguous()  # (R, in)
            self.BT = torch.cat([f.B.T for f in factors]).contiguous()  # (R, out)
            ranks = torch.tensor([0] + [f.rank for f in factors])
            self.offsets = ranks.cumsum(0).to(routing.groups.device)  # (G + 1,) group g's rows: offsets[g]:[g + 1]
            self.bounds = ranks.cumsum(0).tolist()  # the same on the host, for the PyTorch path
            self.groups = routing.groups
            self.native = native.applies(self.A, routing.groups)

    @cached_property
    def segments(self) -> native.Segments | None:
        """The kernel's form of the plan, checked once (native.segments); None where the kernel does not run."""
        return native.segments(self.groups, [self.part()]) if self.native else None

    def part(self, column: int = 0) -> native.Part:
        """The plan as one part of the kernel's segments, adding into y's columns from `column`."""
        return self.A, self.BT, self.offsets, column

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        delta = x.new_zeros(x.shape[0], self.BT.shape[1], dtype=self.A.dtype)  # (N, out) in the factors' dtype
        self.add_to(delta, x.to(self.A.dtype))
        return delta

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> None:
        """y (N, out) += delta, in place (x, y and the factors in one dtype)."""
        if self.segments is not None:
            native.segment_lora_add_(y, x.contiguous(), self.segments)
            return
        for g, rows in enumerate(self.routing.rows):
            r0, r1 = self.bounds[g], self.bounds[g + 1]
            if r1 > r0 and rows.numel() > 0:
                y.index_add_(0, rows, (x.index_select(0, rows) @ self.A[r0:r1].T) @ self.BT[r0:r1])


class Plan(Protocol):
    """One layer's prepared tensors for one batch (what every strategy's plan class offers)."""

    strategy: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """delta (N, out) of the reference semantics for x (N, in)."""

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> None:
        """y (N, out) += delta, in place."""


PLANS: dict[str, Callable[[Routing, list[Factors]], Plan]] = {
    "group": GroupPlan, "packed": PackedPlan, "padded": PaddedPlan, "segment": SegmentPlan,
}
"""The one registry of apply strategies: name -> plan class (built from a batch's Routing and its groups' factors).
engine.cost prices each by the same name; EngineConfig and BatchContext accept these names and 'auto'."""
if set(PLANS) != set(STRATEGY_TERMS):
    raise ImportError(f"engine.cost prices {sorted(STRATEGY_TERMS)}, but the plans are {sorted(PLANS)}")


def make_plan(routing: Routing, factors: list[Factors], strategy: str = "auto",
              cost: CostModel = DEFAULT_COST, calls: int = 1, stack: Callable[[], Stack] | None = None) -> Plan | None:
    """The prepared tensors of one layer for one batch, by the named strategy or the cost model's choice for a
    plan expected to serve `calls` forwards; None when no group has a nonzero rank (the layer adds nothing).
    `stack`: where every group is one adapter, the bank's stack of them (called only if segment runs, and only
    where its kernel runs): segment then builds nothing. Call the plan on x (N, in)."""
    ranks = [f.rank for f in factors]
    if sum(ranks) == 0:
        return None
    A = factors[0].A
    segment = native.applies(A, routing.groups)
    stacked = stack is not None and segment
    if strategy == "auto":
        padded = PaddedPlan.pregathers(routing.tokens, max(ranks), A.shape[1], factors[0].B.shape[0], A.element_size())
        strategy = choose_strategy(routing.tokens, len(factors), sum(ranks), max(ranks), cost, padded, calls, segment,
                                   stacked)
    if strategy == "segment" and stacked:
        return SegmentPlan(routing, factors, stack())
    return PLANS[strategy](routing, factors)


def batched_apply(x: torch.Tensor, groups: torch.Tensor, factors: list[Factors], strategy: str = "auto",
                  cost: CostModel = DEFAULT_COST) -> torch.Tensor | None:
    """delta (N, out) of the reference semantics above, by the named strategy or the cost model's choice;
    None when no group has a nonzero rank (the caller adds nothing). A one-shot `make_plan(...)(x)`."""
    plan = make_plan(Routing(groups, len(factors)), factors, strategy, cost)
    return None if plan is None else plan(x)
