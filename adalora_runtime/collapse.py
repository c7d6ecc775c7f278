"""Whether a finished training run collapsed, and the likely cause: the warnings `adalora train` prints and writes
to report.json. Pure functions of the run's numbers, so the rules are tested on their own.

A run collapsed when its training loss did not move, or when its eval accuracy is no better than always answering
the eval set's most common label. docs/BENCHMARKS.md's lr grid shows both: AdaLoRA at lr 1e-3 ending at chance on RT
sentiment and at the majority class on SMS spam (lambda starts at 0, so it wants a larger lr), LoRA at 1e-2
diverging to one class.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

DEFAULT_LR = {"adalora": 1e-2, "lora": 1e-3}
"""lr of each mode when none is given (`adalora train`, TrainSpec): the best lr of both modes on docs/BENCHMARKS.md's
MiniLM grid (AdaLoRA 1e-2 on TREC-6, SMS spam and RT sentiment; LoRA 1e-3 keeps all three, 3e-3 and up collapse
SMS spam)."""
MOVED = 0.05
"""The loss moved when the mean of its last tenth of steps is at least this fraction below the first tenth's."""
MARGIN = 0.005
"""Accuracy within this of the majority-class rate counts as at it."""


def majority_rate(labels: Sequence[str]) -> float | None:
    """The share of the most common label, None without labels."""
    if not labels:
        return None
    return Counter(labels).most_common(1)[0][1] / len(labels)


def tenths(losses: Sequence[float]) -> tuple[float, float]:
    """(mean loss over the first tenth of the steps, over the last tenth); at least one step each."""
    tenth = max(1, len(losses) // 10)
    return sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth


def loss_moved(losses: Sequence[float]) -> bool | None:
    """Whether the loss fell by MOVED from the first tenth of steps to the last; None with under 4 steps."""
    if len(losses) < 4:
        return None
    first, last = tenths(losses)
    return math.isfinite(last) and last <= (1 - MOVED) * first


def cause(mode: str, lr: float) -> str:
    """The likely cause, from how the lr compares with the mode's default."""
    default = DEFAULT_LR[mode]
    if lr < default / 2:
        why = (f"the lr {lr:g} is likely too low for {mode}" +
               (" (lambda starts at 0, so AdaLoRA needs a larger lr than LoRA)" if mode == "adalora" else ""))
    elif lr > default * 2:
        why = f"the lr {lr:g} is likely too high for {mode} (the run diverged into one answer)"
    else:
        why = f"at lr {lr:g} the run may be too short or the task too hard for this budget"
    return f"{why}; try --lr {default:g} (the {mode} default), or more steps"


def diagnose(mode: str, lr: float, losses: Sequence[float], accuracy: float | None,
             labels: Sequence[str] = ()) -> list[str]:
    """Warnings for a collapsed run (empty for a healthy one): its loss did not move, or its eval accuracy is no
    better than the eval labels' majority-class rate (not judged when the eval labels are all one class)."""
    found = []
    if loss_moved(losses) is False:
        first, last = tenths(losses)
        found.append(f"the training loss did not move ({first:.4f} over the first tenth of the steps, {last:.4f} "
                     f"over the last)")
    rate = majority_rate(labels)
    if accuracy is not None and rate is not None and rate < 1 - MARGIN and accuracy <= rate + MARGIN:
        found.append(f"eval accuracy {accuracy:.4f} is no better than the majority-class rate {rate:.4f} (always "
                     f"answering the most common label)")
    if not found:
        return []
    advice = cause(mode, lr)
    return [f"this run looks collapsed: {' and '.join(found)}. {advice[0].upper()}{advice[1:]}."]
