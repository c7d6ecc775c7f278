"""The cost model behind the 'auto' apply strategy: what one call, and one build, of each strategy's plan costs
for one layer (engine.apply holds the plans; engine.calibrate fits this model to measured times)."""

from __future__ import annotations

from dataclasses import dataclass

from adalora.config import ConfigError, is_int, is_number


def _group_terms(tokens: int, groups: int, sum_rank: int, max_rank: int) -> dict[str, float]:
    if groups == 1:
        return {"launch": 2, "work": tokens * sum_rank}
    return {"launch": 4 * groups, "work": tokens * sum_rank / groups, "gather": tokens}


STRATEGY_TERMS = {
    "group": (_group_terms, lambda tokens, groups, sum_rank, max_rank: {}),
    "packed": (lambda tokens, groups, sum_rank, max_rank: {"launch": 3, "work": tokens * sum_rank},
               lambda tokens, groups, sum_rank, max_rank: {"build": 1, "build_group": groups,
                                                           "build_column": sum_rank}),
    "padded": (lambda tokens, groups, sum_rank, max_rank: {"launch": 2, "bmm": tokens * max_rank},
               lambda tokens, groups, sum_rank, max_rank: {"build": 1, "build_group": groups,
                                                           "build_column": (groups + 1 + tokens) * max_rank}),
    "segment": (lambda tokens, groups, sum_rank, max_rank: {"launch": 1, "work": tokens * sum_rank / groups},
                lambda tokens, groups, sum_rank, max_rank: {"build": 1, "build_segment": groups,
                                                            "build_column": sum_rank}),
}
"""strategy -> (terms of one call of its plan, terms of building it), in tie-break order: CostModel's formulas."""


COST_PARAMETERS = ("launch", "gather", "bmm", "build", "build_group", "build_segment", "build_column")


def cost_terms(strategy: str, tokens: int, distinct: int, sum_rank: int, max_rank: int,
               build: bool = False) -> dict[str, float]:
    """The coefficients of one call of a strategy's plan (or, with `build`, of building it): its cost under a
    CostModel is terms['work'] + the sum of getattr(model, name) * terms[name] over the other names. The one
    place of CostModel's formulas (STRATEGY_TERMS, written out in its docstring), shared with
    `engine.calibrate`'s fit."""
    call, built = STRATEGY_TERMS[strategy]
    return (built if build else call)(tokens, max(distinct, 1), sum_rank, max_rank)


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
    - segment: launch  +  N * S / G, only where the native CPU kernel runs (float32 on an AVX2 CPU,
      `engine.native`; each token multiplies its own group's ranks, in one call)

    Building a plan, paid once per batch composition (a decode batch keeps its plans until a request joins
    or leaves):
    - group:  nothing (its row indices are the batch's, shared by every layer)
    - packed: build  +  build_group * G  +  build_column * S  (concatenate every group's factors once)
    - padded: build  +  build_group * G  +  build_column * (G + 1 + N) * M  (pad each group to M, then gather a
      copy per token)
    - segment: build  +  build_segment * G  +  build_column * S  (stack every group's factors once, as packed,
      with no mask or per-call index to prepare: its own per-group price); nothing where every group is one
      adapter (`stacked`: the plan runs on the bank's own stack of its slots, `SlotBank.stacked`)
    (`build`: the fixed ops of any build, whatever its size)

    A plan expected to serve `calls` forwards costs call + build / calls per forward: a prefill (1 call)
    or a decode batch that changes at every step pays the whole build, a batch that decodes 64 tokens
    unchanged hardly any. So group, which builds nothing, wins a single forward of one adapter; segment, whose
    build is cheap and call cheapest, wins from a few adapters even for one forward (a prefill) where its kernel
    runs; without it packed and padded win once a composition lives a few steps. `launch` is the fixed cost of
    one operator call (dispatch, kernel launch) in the same units. The defaults are the fit that
    `benchmarks/engine_apply.py` printed on SmolLM2-135M's layer shapes, float32, 2 threads of a 2-core CPU
    (docs/BENCHMARKS.md), to two digits; there a build's cost is a fixed part and per-group work for packed and
    padded (build_column fitted to 0, and build_segment to 0: segment's stacking is all fixed cost at these
    sizes). Ties go to group, then packed. Another device wants its own numbers: rerun that benchmark and pass
    the CostModel it prints.
    """

    launch: float = 140.0
    gather: float = 37.0
    bmm: float = 5.9
    build: float = 960.0
    build_group: float = 1100.0
    build_segment: float = 0.0
    build_column: float = 0.0

    def __post_init__(self) -> None:
        for name in COST_PARAMETERS:
            value = getattr(self, name)
            if not is_number(value, 0):
                raise ConfigError(f"CostModel.{name} must be a finite number >= 0, got {value!r}")

    def cost(self, terms: dict[str, float]) -> float:
        """The cost of `cost_terms(...)` under this model."""
        return terms.get("work", 0.0) + sum(getattr(self, name) * c for name, c in terms.items() if name != "work")

    def costs(self, tokens: int, distinct: int, sum_rank: int, max_rank: int, padded: bool = True,
              calls: int = 1, segment: bool = False, stacked: bool = False) -> dict[str, float]:
        """Cost per forward of each strategy over a plan that serves `calls` forwards (its build shared);
        `padded` False leaves padded out (its plan would not pre-gather), `segment` False leaves segment out
        (the native kernel does not run on these tensors), `stacked` True makes segment's build free (every
        group is one adapter: the plan runs on the bank's stack)."""
        if not is_int(calls, 1):
            raise ValueError(f"calls must be a positive integer, got {calls!r}")

        def build(name: str) -> float:
            if stacked and name == "segment":
                return 0.0
            return self.cost(cost_terms(name, tokens, distinct, sum_rank, max_rank, build=True))

        return {name: self.cost(cost_terms(name, tokens, distinct, sum_rank, max_rank)) + build(name) / calls
                for name in STRATEGY_TERMS if (padded or name != "padded") and (segment or name != "segment")}


DEFAULT_COST = CostModel()


def choose_strategy(tokens: int, distinct: int, sum_rank: int, max_rank: int, cost: CostModel = DEFAULT_COST,
                    padded: bool = True, calls: int = 1, segment: bool = False, stacked: bool = False) -> str:
    """The cheapest strategy under `cost` for N tokens, G distinct groups, their summed and max rank, over a
    plan expected to serve `calls` forwards; `padded` False when a padded plan would not pre-gather, `segment`
    True where the native kernel runs, `stacked` True where segment would run on the bank's stack."""
    costs = cost.costs(tokens, distinct, sum_rank, max_rank, padded, calls, segment, stacked)
    return min(costs, key=lambda name: (costs[name], list(STRATEGY_TERMS).index(name)))


