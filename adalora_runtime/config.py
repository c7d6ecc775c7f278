"""Typed, validated-once configuration of the adapters and the rank schedule."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

MODES = ("adalora", "lora")
DEFAULT_LAMBDA_LR_SCALE = 10.0
"""lam learns this much faster than P and Q by default; docs/METHOD.md shows why and what it changes."""
INITS = ("orthogonal", "peft")
DEFAULT_TARGET_FRACTION = 2 / 3
"""adalora mode without target_r or budget: target_r = init_r * 2/3."""


class ConfigError(ValueError):
    """A configuration value is inconsistent; the message says which value to change."""


def is_int(x: object, low: int | None = None, high: int | None = None) -> bool:
    """Whether x is an int (never a bool) within [low, high] (either bound optional): the one integer check of
    every config and request field."""
    return isinstance(x, int) and not isinstance(x, bool) and (low is None or x >= low) and (high is None or x <= high)


def is_number(x: object, low: float | None = None, high: float | None = None) -> bool:
    """Whether x is a finite int or float (never a bool) within [low, high]."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        finite = math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False
    return finite and (low is None or x >= low) and (high is None or x <= high)


@dataclass(frozen=True)
class AdapterShape:
    """What an adapter is, before the run's length is known: form, rank budget, scale, regularization.

    `scheduled(total_step)` turns it into the AdaLoraConfig of one run; `adalora train` holds one of these
    (TrainSpec.adapter) because with `--epochs` the step count is known only after the data is read.
    """

    mode: str = "adalora"
    """'adalora' (SVD form with pruning) or 'lora' (fixed rank, lam frozen at 1, same code path)."""
    init_r: int = 12
    """Rank every adapted matrix starts with (the LoRA rank in lora mode)."""
    target_r: float | None = None
    """Target average rank per adapted matrix; the final budget is int(target_r * n_layers) triplets."""
    budget: int | None = None
    """Target total number of adapter parameters (alternative to target_r)."""
    lora_alpha: float = 8.0
    """Output scale is lora_alpha / init_r, held constant after pruning (PEFT's convention)."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: tuple[str, ...] = ()
    """Module path suffixes to adapt (e.g. 'q_proj'); empty = the architecture's default."""
    beta1: float = 0.85
    """EMA factor of the sensitivity |w * grad|."""
    beta2: float = 0.85
    """EMA factor of the uncertainty |I - Ibar|."""
    orth_reg_weight: float = 0.5
    """Weight gamma of the orthogonal regularizer (0 disables it)."""
    init: str = "orthogonal"
    """'orthogonal': P and Q start with orthonormal columns / rows (see docs/METHOD.md);
    'peft': N(0, 0.02) as PEFT does."""
    lambda_lr_scale: float = DEFAULT_LAMBDA_LR_SCALE
    """Learning-rate multiplier for lam, read by training.make_optimizer (1.0 = PEFT's single lr)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r} is not one of {MODES}")
        if self.init not in INITS:
            raise ConfigError(f"init={self.init!r} is not one of {INITS}")
        if self.init_r < 1:
            raise ConfigError(f"init_r={self.init_r} must be >= 1")
        if self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha={self.lora_alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"orth_reg_weight={self.orth_reg_weight} must be >= 0")
        if self.lambda_lr_scale <= 0:
            raise ConfigError(f"lambda_lr_scale={self.lambda_lr_scale} must be > 0")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ConfigError(f"{name}={value} must be in (0, 1)")
        if self.mode == "lora":
            if self.target_r is not None or self.budget is not None:
                raise ConfigError("lora mode prunes nothing: drop target_r / budget, or use mode='adalora'")
            return
        if self.target_r is not None and self.budget is not None:
            raise ConfigError("give exactly one of target_r (average rank) or budget (parameter count)")
        if self.target_r is not None and not 0 <= self.target_r <= self.init_r:
            raise ConfigError(f"target_r={self.target_r} must be in [0, init_r={self.init_r}]")
        if self.budget is not None and self.budget < 0:
            raise ConfigError(f"budget={self.budget} must be >= 0")

    def scheduled(self, total_step: int, tinit: int | None = None, tfinal: int | None = None,
                  deltaT: int | None = None) -> AdaLoraConfig:
        """The config of a run of total_step steps. In adalora mode the schedule is `schedule_from_fractions`
        except where tinit / tfinal / deltaT are given, and target_r = init_r * DEFAULT_TARGET_FRACTION where
        neither target_r nor budget is (ConfigError names an inconsistent schedule)."""
        fields = {name: getattr(self, name) for name in AdapterShape.__dataclass_fields__}
        if self.mode == "lora":
            return AdaLoraConfig(**fields, total_step=total_step)
        if self.target_r is None and self.budget is None:
            fields["target_r"] = self.init_r * DEFAULT_TARGET_FRACTION
        schedule = schedule_from_fractions(total_step)
        given = {"tinit": tinit, "tfinal": tfinal, "deltaT": deltaT}
        schedule.update({name: value for name, value in given.items() if value is not None})
        return AdaLoraConfig(**fields, total_step=total_step, **schedule)


@dataclass(frozen=True)
class AdaLoraConfig(AdapterShape):
    """Adapter shape, schedule and regularization for one training run.

    Budget: give exactly one of `target_r` (average rank per adapted matrix, PEFT's unit) or
    `budget` (total trainable adapter parameters, counting r * (in + out + 1) per layer) in
    adalora mode. In lora mode every layer keeps `init_r` and nothing is pruned.
    """

    tinit: int = 0
    """Steps at the full budget before pruning starts."""
    tfinal: int = 0
    """Final steps with the mask frozen at the target budget."""
    deltaT: int = 1
    """Re-mask every deltaT steps during the cubic phase."""
    total_step: int = 1
    """Total optimizer steps of the run (the schedule needs it up front)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.total_step < 1:
            raise ConfigError(f"total_step={self.total_step} must be >= 1")
        if self.mode == "lora":
            return
        if self.target_r is None and self.budget is None:
            raise ConfigError("give exactly one of target_r (average rank) or budget (parameter count)")
        self._validate_schedule()

    def _validate_schedule(self) -> None:
        if self.tinit < 0 or self.tfinal < 0 or self.deltaT < 1:
            raise ConfigError(f"need tinit >= 0, tfinal >= 0, deltaT >= 1 (got {self.tinit}, {self.tfinal}, {self.deltaT})")
        if self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(
                f"no budgeting phase: tinit={self.tinit} must be < total_step - tfinal = "
                f"{self.total_step} - {self.tfinal}; decrease tinit/tfinal or increase total_step"
            )
        if self.deltaT > self.total_step - self.tfinal - self.tinit:
            raise ConfigError(
                f"deltaT={self.deltaT} exceeds the budgeting phase of "
                f"{self.total_step - self.tfinal - self.tinit} steps: decrease deltaT"
            )

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.init_r

    def to_dict(self) -> dict:
        out = asdict(self)
        out["target_modules"] = list(self.target_modules)
        return out


def schedule_from_fractions(total_step: int, tinit: float = 0.1, tfinal: float = 0.2, n_masks: int = 50) -> dict:
    """Default schedule as fractions of the run: warm-up, final phase, about n_masks re-masks."""
    t_i = int(math.floor(total_step * tinit))
    t_f = int(math.floor(total_step * tfinal))
    phase = max(1, total_step - t_i - t_f)
    return {"tinit": t_i, "tfinal": t_f, "deltaT": max(1, phase // n_masks)}
