"""The engine's one typed config, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass

from adalora.config import ConfigError
from adalora.engine.apply import PLANS
from adalora.engine.cost import DEFAULT_COST, CostModel

STRATEGIES = ("auto", *PLANS)


@dataclass(frozen=True)
class EngineConfig:
    """How many adapters the engine holds at once and which modules it serves."""

    max_slots: int = 16
    """Adapters loaded at the same time; loading one more raises SlotsFull."""
    target_modules: tuple[str, ...] = ()
    """Module path suffixes to serve (e.g. 'q_proj'); empty = every linear map of the architecture's
    default set. An adapter may adapt any subset of these, never a module outside them."""
    cost: CostModel = DEFAULT_COST
    """The cost model of the 'auto' apply strategy; the default is fitted on a CPU (see CostModel): on another
    device, fit one with benchmarks/engine_apply.py."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_slots, int) or self.max_slots < 1:
            raise ConfigError(f"max_slots must be a positive integer, got {self.max_slots!r}")
        if not isinstance(self.cost, CostModel):
            raise ConfigError(f"cost must be an engine.cost.CostModel, got {type(self.cost).__name__}")
        if isinstance(self.target_modules, str):
            raise ConfigError(f"target_modules must be a tuple of names, got the string {self.target_modules!r}; "
                              f"write ({self.target_modules!r},)")


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown apply strategy {strategy!r}; choose one of {STRATEGIES}")
    return strategy
