"""Edge mode: the merged model equals the adapter attached; swaps rewrite only touched layers; deactivating
restores the base bit for bit (fp32 and bf16, Linear and Conv1D)."""

import copy

import pytest
import torch

from adalora.engine import EdgeMerger
from adalora.inject import attach_adapter
from tests.test_engine_model import MODELS, ids_for, run, three_adapters


@pytest.fixture(scope="module", params=list(MODELS))
def setup(request):
    build, targets, task_type = MODELS[request.param]
    base = build()
    return base, three_adapters(base, targets, task_type)


def attached(base, adapter, ids):
    model = copy.deepcopy(base)
    attach_adapter(model, adapter)
    return run(model, ids)


def same_weights(model, reference):
    ref = reference.state_dict()
    return all(torch.equal(t, ref[k]) for k, t in model.state_dict().items())


# activation sequences, ending active on the last name
SEQUENCES = [("a",), ("a", "b"), ("b", "c", "a"), ("a", "a")]


@pytest.mark.parametrize("sequence", SEQUENCES, ids="-".join)
def test_swaps_equal_attach_and_deactivate_restores_bits(setup, sequence):
    base, adapters = setup
    model = copy.deepcopy(base)
    edge = EdgeMerger(model)
    ids = ids_for([None, None])
    previous: set[str] = set()
    for name in sequence:
        touched = edge.activate(adapters[name])
        assert set(touched) == previous | set(adapters[name].layers)  # only layers either adapter changes
        assert set(edge.originals) == set(adapters[name].layers)  # originals kept only where merged
        previous = set(adapters[name].layers)
    torch.testing.assert_close(run(model, ids), attached(base, adapters[sequence[-1]], ids), atol=1e-5, rtol=1e-5)
    assert set(edge.deactivate()) == previous
    assert same_weights(model, base) and not edge.originals and edge.active is None
    assert edge.deactivate() == []


def test_untouched_layers_are_never_written(setup):
    base, adapters = setup
    model = copy.deepcopy(base)
    edge = EdgeMerger(model)
    edge.activate(adapters["a"])
    merged = model.state_dict()
    base_state = base.state_dict()
    touched_weights = {f"{path}.weight" for path in adapters["a"].layers}
    for key, tensor in merged.items():
        assert torch.equal(tensor, base_state[key]) == (key not in touched_weights)


def test_bf16_restore_is_bit_exact(setup):
    base, adapters = setup
    half = copy.deepcopy(base).to(torch.bfloat16)
    model = copy.deepcopy(half)
    edge = EdgeMerger(model)
    edge.activate(adapters["a"])
    edge.activate(adapters["b"])
    assert any(not torch.equal(model.state_dict()[f"{p}.weight"], half.state_dict()[f"{p}.weight"])
               for p in adapters["b"].layers)
    edge.deactivate()
    assert same_weights(model, half)
