"""fit_cost_model recovers a CostModel from times that it generated, and refuses what it cannot fit."""

import random

import pytest

from adalora.config import ConfigError
from adalora.engine.apply import PLANS
from adalora.engine.cost import COST_PARAMETERS, CostModel, cost_terms
from adalora.engine.calibrate import fit_cost_model

TRUE = CostModel(launch=180.0, gather=45.0, bmm=7.5, build=700.0, build_group=900.0, build_segment=400.0,
                 build_column=30.0)


def measurements(model, unit_us=0.05, seed=0):
    """(terms, microseconds) of every strategy's call and build over random compositions, as `model` says."""
    rng = random.Random(seed)
    out = []
    for _ in range(12):
        tokens, distinct = rng.choice([1, 8, 16, 32, 256]), rng.randint(1, 16)
        max_rank = rng.randint(1, 12)
        sum_rank = rng.randint(max_rank, max_rank * distinct)
        for name in PLANS:
            for build in (False, True):
                terms = cost_terms(name, tokens, distinct, sum_rank, max_rank, build)
                if terms:
                    out.append((terms, unit_us * model.cost(terms)))
    return out


def test_fit_recovers_the_model_that_made_the_times():
    fitted = fit_cost_model(measurements(TRUE))
    for name in COST_PARAMETERS:
        assert getattr(fitted, name) == pytest.approx(getattr(TRUE, name), rel=1e-6)


def test_fit_clips_a_negative_parameter_to_zero():
    """Times in which a gather saves time (a negative parameter, which no CostModel may hold) fit as 0."""
    data = [(terms, 0.05 * (TRUE.cost(terms) - 2 * TRUE.gather * terms.get("gather", 0.0)))
            for terms, _ in measurements(TRUE)]
    data = [(terms, us) for terms, us in data if us > 0]
    fitted = fit_cost_model(data)
    assert fitted.gather == 0.0 and fitted.launch > 0


@pytest.mark.parametrize("data,message", [
    ([({"work": 1.0}, 1.0)] * 7, "at least 8 measurements"),
    ([({"work": 1.0, "latency": 2.0}, 1.0)] * 8, r"unknown cost terms \['latency'\]"),
    ([({"work": 1.0}, 0.0)] * 8, "must be positive"),
    ([({"work": 1.0, "launch": 1.0}, 1.0), ({"work": 2.0, "launch": 1.0}, 0.5)] * 4, "no positive cost per unit"),
])
def test_fit_refuses(data, message):
    with pytest.raises(ConfigError, match=message):
        fit_cost_model(data)


@pytest.mark.parametrize("field", COST_PARAMETERS)
@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), True, "1"])
def test_cost_model_refuses_a_parameter_that_is_not_a_finite_nonnegative_number(field, value):
    with pytest.raises(ConfigError, match=f"CostModel.{field} must be a finite number >= 0"):
        CostModel(**{field: value})


@pytest.mark.parametrize("calls", [0, -3, 2.0, True])
def test_costs_refuse_calls_that_are_not_a_positive_integer(calls):
    with pytest.raises(ValueError, match="calls must be a positive integer"):
        CostModel().costs(8, 8, 64, 12, calls=calls)


def test_costs_share_the_build_over_the_calls():
    """cost per forward = call + build / calls, for every strategy."""
    model = CostModel()
    for calls in (1, 7, 64):
        costs = model.costs(16, 5, 40, 12, calls=calls, segment=True)
        for name in PLANS:
            call = model.cost(cost_terms(name, 16, 5, 40, 12))
            build = model.cost(cost_terms(name, 16, 5, 40, 12, build=True))
            assert costs[name] == pytest.approx(call + build / calls)
