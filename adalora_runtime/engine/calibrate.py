"""Fit a CostModel to measured times (benchmarks/engine_apply.py prints the fit for the device it ran on).

Each measurement is one equation: a plan call's or a plan build's cost terms (`cost_terms`, summed over
the layers timed together) and the microseconds it took. The model says time = unit * cost(terms), with
`unit` the microseconds of one unit of matmul work; that is linear in (unit, unit * each parameter), so
one least-squares solve on relative errors (each equation divided by its time) gives all of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from adalora.config import ConfigError
from adalora.engine.cost import COST_PARAMETERS, CostModel


def fit_cost_model(equations: Sequence[tuple[Mapping[str, float], float]]) -> CostModel:
    """The CostModel that best explains `equations` [(terms, microseconds), ...]; a parameter the fit puts
    below 0 is clipped to 0. Needs at least as many equations as unknowns (the parameters and the unit)."""
    names = ("work", *COST_PARAMETERS)
    if len(equations) < len(names):
        raise ConfigError(f"a cost model fit needs at least {len(names)} measurements, got {len(equations)}")
    unknown = sorted({n for terms, _ in equations for n in terms} - set(names))
    if unknown:
        raise ConfigError(f"unknown cost terms {unknown}; terms come from engine.cost.cost_terms")
    if any(not us > 0 for _, us in equations):
        raise ConfigError("every measured time must be positive")
    X = np.array([[terms.get(n, 0.0) / us for n in names] for terms, us in equations])
    a, *_ = np.linalg.lstsq(X, np.ones(len(equations)), rcond=None)
    if not a[0] > 0:
        raise ConfigError("the fit found no positive cost per unit of matmul work: measure larger batches or ranks")
    return CostModel(**{n: float(max(0.0, a[i] / a[0])) for i, n in enumerate(names) if n != "work"})
