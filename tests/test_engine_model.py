"""Full-model mixed batches: each row equals that row run alone with its adapter attached (or the linear
merge of its mixture attached); load / unload / reload leave the other adapters' outputs unchanged."""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from adalora.engine import AdapterEngine, EngineConfig
from adalora.inject import attach_adapter
from tests.conftest import tiny_bert, tiny_llama
from tests.factories import random_adapter
from adalora.tools.merge import MergeParams, merge_adapters

BERT_ALL = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
GPT2_ALL = ("c_attn", "c_proj", "c_fc")
T = 5


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """Conv1D layers (weight stored (in, out))."""
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def three_adapters(base, targets, task_type):
    """Different init_r, lora_alpha, random per-layer ranks (some 0) and different adapted subsets."""
    return {
        "a": random_adapter(base, 1, init_r=4, lora_alpha=8.0, targets=targets, task_type=task_type),
        "b": random_adapter(base, 2, init_r=6, lora_alpha=3.0, targets=targets[::2], task_type=task_type),
        "c": random_adapter(base, 3, init_r=3, lora_alpha=3.0, targets=targets[1:], task_type=task_type),
    }


# model name: (builder, targets, task type)
MODELS = {
    "llama": (tiny_llama, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), "causal-lm"),
    "bert": (tiny_bert, BERT_ALL, "feature-extraction"),
    "gpt2_conv1d": (tiny_gpt2, GPT2_ALL, "causal-lm"),
}
MIX = {"a": 0.7, "b": -0.3}
ROWS = ["a", None, "b", MIX, "c", "a"]


@pytest.fixture(scope="module", params=list(MODELS))
def setup(request):
    build, targets, task_type = MODELS[request.param]
    base = build()
    return base, three_adapters(base, targets, task_type)


def ids_for(rows):
    return (torch.arange(len(rows) * T).view(len(rows), T) * 7) % 60 + 2


def run(model, ids):
    """Logits of a causal LM; BERT's last hidden state (its random classifier barely moves the logits)."""
    with torch.no_grad():
        if hasattr(model, "bert"):
            return model.bert(input_ids=ids).last_hidden_state
        return model(input_ids=ids).logits


def alone(base, adapters, request, ids):
    """Reference: one row, on a fresh copy of the base with its adapter attached (a mix: its linear merge)."""
    model = copy.deepcopy(base)
    if isinstance(request, dict):
        attach_adapter(model, merge_adapters([adapters[k] for k in request], "linear",
                                             MergeParams(weights=tuple(request.values()))))
    elif request is not None:
        attach_adapter(model, adapters[request])
    return run(model, ids)


def engine_over(base, adapters, max_slots=4):
    model = copy.deepcopy(base)
    engine = AdapterEngine(model, EngineConfig(max_slots=max_slots))
    for name, adapter in adapters.items():
        engine.load(name, adapter)
    return engine


@pytest.mark.parametrize("strategy", ["auto", "group", "packed", "padded"])
def test_mixed_batch_rows_equal_each_row_alone(setup, strategy):
    base, adapters = setup
    engine = engine_over(base, adapters)
    ids = ids_for(ROWS)
    with engine.batch(engine.context(ROWS, T, strategy)):
        mixed = run(engine.model, ids)
    for row, request in enumerate(ROWS):
        expected = alone(base, adapters, request, ids[row:row + 1])
        torch.testing.assert_close(mixed[row:row + 1], expected, atol=1e-5, rtol=1e-5, msg=f"row {row}: {request}")
        if request is not None:  # the adapters do change the output, so the comparison is not vacuous
            assert (mixed[row] - run(base, ids[row:row + 1])[0]).abs().max() > 1e-3


def test_raw_slot_indices_per_token(setup):
    """context_from_slots: per-token slots (-1 included) reproduce the per-row context."""
    base, adapters = setup
    engine = engine_over(base, adapters)
    rows = ["c", None, "a"]
    ids = ids_for(rows)
    slots = torch.tensor([engine.slots.slot(r) if r else -1 for r in rows]).repeat_interleave(T).view(len(rows), T)
    with engine.batch(engine.context_from_slots(slots)):
        raw = run(engine.model, ids)
    with engine.batch(engine.context(rows, T)):
        per_row = run(engine.model, ids)
    torch.testing.assert_close(raw, per_row, atol=1e-6, rtol=1e-6)


def test_outside_a_batch_the_model_is_the_base(setup):
    base, adapters = setup
    engine = engine_over(base, adapters)
    ids = ids_for(ROWS)
    assert torch.equal(run(engine.model, ids), run(base, ids))


def test_unload_and_reload_leave_other_adapters_unchanged(setup):
    base, adapters = setup
    engine = engine_over(base, adapters)
    rows = ["b", "a", "c", None]
    ids = ids_for(rows)

    def logits(requests):
        with engine.batch(engine.context(requests, T, "group")):
            return run(engine.model, ids)

    before = logits(rows)
    b_slot = engine.slots.slot("b")
    b_tensors = {path: bank.get(b_slot) for path, bank in engine.slots.banks.items()}
    engine.unload("a")
    assert "a" not in engine.slots.loaded()
    after_unload = logits(["b", None, "c", None])
    for row in (0, 2, 3):
        assert torch.equal(after_unload[row], before[row])
    assert engine.load("a2", adapters["a"]) == 0  # the freed slot is reused
    after_reload = logits(["b", "a2", "c", None])
    assert torch.equal(after_reload, before)
    for path, bank in engine.slots.banks.items():  # b's slot was never rewritten
        assert bank.get(b_slot).A is b_tensors[path].A and bank.get(b_slot).B is b_tensors[path].B


def test_bytes_per_adapter_at_own_ranks(setup):
    base, adapters = setup
    engine = engine_over(base, adapters)
    for name, adapter in adapters.items():
        expected = sum(layer.rank * sum(adapter.shapes[p]) * 4 for p, layer in adapter.layers.items())
        assert engine.slots.nbytes(name) == expected
    half = AdapterEngine(copy.deepcopy(base).to(torch.bfloat16))
    half.load("a", adapters["a"])
    assert half.slots.nbytes("a") == engine.slots.nbytes("a") // 2
    factors = half.slots.banks[next(iter(adapters["a"].layers))].get(0)
    assert factors.A.dtype == torch.bfloat16 and factors.A.device == next(half.model.parameters()).device
