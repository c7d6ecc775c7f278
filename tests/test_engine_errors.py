"""Every engine error path, with its class and the part of the message that tells the user what to do."""

import copy
import dataclasses

import pytest
import torch

from adalora.config import ConfigError
from adalora.engine import (AdapterEngine, AdapterExists, AdapterMismatch, AdapterNotFound, BatchContext,
                                    BatchError, EdgeMerger, EngineConfig, EngineError, SlotsFull, install_multi_linear)
from tests.conftest import tiny_bert, tiny_llama
from tests.factories import random_adapter

BASE = tiny_llama()
A = random_adapter(BASE, 1, init_r=4)
B = random_adapter(BASE, 2, init_r=3)
A_PATH = next(iter(A.shapes))  # model.layers.0.self_attn.q_proj
BERT_ADAPTER = random_adapter(tiny_bert(), 3, targets=("query",), task_type="feature-extraction")


def engine(max_slots=4, targets=()):
    return AdapterEngine(copy.deepcopy(BASE), EngineConfig(max_slots=max_slots, target_modules=targets))


def loaded(*names, max_slots=4):
    e = engine(max_slots)
    for name in names:
        e.load(name, {"a": A, "b": B}[name[0]])
    return e


def wrong_shape():
    shapes = dict(A.shapes)
    shapes[A_PATH] = (shapes[A_PATH][0] + 1, shapes[A_PATH][1])
    return dataclasses.replace(A, shapes=shapes)


def forward(e, context, tokens=3):
    with e.batch(context):
        e.model(input_ids=torch.ones(1, tokens, dtype=torch.long))


def nested(e):
    context = e.context(["a"], 2)
    with e.batch(context), e.batch(context):
        pass


# name: (action, exception, message fragment)
CASES = {
    "duplicate_id": (lambda: loaded("a").load("a", B), AdapterExists, "'a' is already loaded (slot 0); unload it first"),
    "unload_unknown": (lambda: loaded("a").unload("z"), AdapterNotFound, "adapter 'z' is not loaded (loaded: ['a'])"),
    "unload_twice": (lambda: [e := loaded("a"), e.unload("a"), e.unload("a")], AdapterNotFound, "'a' is not loaded"),
    "request_unknown": (lambda: loaded("a").context(["a", "q"], 2), AdapterNotFound, "adapter 'q' is not loaded"),
    "mix_unknown": (lambda: loaded("a").context([{"a": 1.0, "q": 1.0}], 2), AdapterNotFound, "'q' is not loaded"),
    "capacity": (lambda: loaded("a", "b", max_slots=2).load("a3", A), SlotsFull,
                 "all 2 adapter slots are in use (['a', 'b']); unload one or create the engine with a larger EngineConfig.max_slots"),
    "other_base": (lambda: loaded().load("x", BERT_ADAPTER), AdapterMismatch, "this engine serves"),
    "shape": (lambda: loaded().load("x", wrong_shape()), AdapterMismatch, f"module {A_PATH!r}: adapter expects (in, out)=(33, 32)"),
    "unserved_module": (lambda: engine(targets=("k_proj",)).load("x", A), AdapterMismatch,
                        f"adapter adapts module {A_PATH!r}, which this engine does not serve; create the engine with "
                        "target_modules that include 'q_proj'"),
    "empty_mix": (lambda: loaded("a").context([{}], 2), BatchError, "row 0: an empty mixture"),
    "nan_weight": (lambda: loaded("a").context([None, {"a": float("nan")}], 2), BatchError,
                   "row 1: weight of 'a' must be a finite number, got nan"),
    "text_weight": (lambda: loaded("a").context([{"a": "0.5"}], 2), BatchError, "must be a finite number, got '0.5'"),
    "no_tokens": (lambda: loaded("a").context(["a"], 0), BatchError, "tokens_per_row must be at least 1"),
    "token_count": (lambda: forward(e := loaded("a"), e.context(["a"], 2)), BatchError,
                    "the batch context routes 2 tokens but this layer got input of shape (1, 3, 32)"),
    "nested_batch": (lambda: nested(loaded("a")), BatchError, "a batch context is already active"),
    "empty_slot": (lambda: loaded("a").context_from_slots(torch.tensor([0, 2])), BatchError,
                   "token slot index 2 holds no adapter (loaded: {'a': 0})"),
    "slot_out_of_range": (lambda: loaded("a").context_from_slots(torch.tensor([9])), BatchError, "token slot index 9"),
    "slot_below_base": (lambda: loaded("a").context_from_slots(torch.tensor([-2, 0])), BatchError,
                        "slot indices must be -1 (base) or a loaded slot, got -2"),
    "strategy": (lambda: loaded("a").context(["a"], 2, strategy="fast"), ConfigError,
                 "unknown apply strategy 'fast'; choose one of ('auto', 'group', 'packed', 'padded', 'segment')"),
    "groups_dtype": (lambda: BatchContext(groups=torch.zeros(2), routes=()), BatchError, "groups must be a 1-D long tensor"),
    "max_slots": (lambda: EngineConfig(max_slots=0), ConfigError, "max_slots must be a positive integer, got 0"),
    "targets_string": (lambda: EngineConfig(target_modules="q_proj"), ConfigError, "write ('q_proj',)"),
    "unknown_target": (lambda: engine(targets=("nope",)), ConfigError, "unknown target module(s) ['nope']"),
    "second_engine": (lambda: AdapterEngine(engine().model), EngineError, "already serves adapters: create one engine per model"),
    "install_wrong_bank": (lambda: install_multi_linear(
        copy.deepcopy(BASE), {A_PATH: engine().slots.banks["model.layers.0.mlp.up_proj"]}, None), EngineError,
        f"{A_PATH}: bank is (in, out)=(32, 48), module is (32, 32)"),
    "edge_other_base": (lambda: EdgeMerger(copy.deepcopy(BASE)).activate(BERT_ADAPTER), AdapterMismatch, "trained on base"),
    "edge_shape": (lambda: EdgeMerger(copy.deepcopy(BASE)).activate(wrong_shape()), AdapterMismatch, f"module {A_PATH!r}"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_error(case):
    action, error, fragment = CASES[case]
    with pytest.raises(error) as info:
        action()
    assert fragment in str(info.value)


def test_failed_load_leaves_the_engine_unchanged():
    e = loaded("a", max_slots=2)
    before = {path: bank.get(0) for path, bank in e.slots.banks.items()}
    with pytest.raises(AdapterMismatch):
        e.load("x", wrong_shape())
    assert e.slots.loaded() == {"a": 0}
    assert e.load("b", B) == 1
    assert all(bank.get(0) is before[path] for path, bank in e.slots.banks.items())


def test_batch_block_clears_the_context_after_an_error():
    e = loaded("a")
    with pytest.raises(BatchError):
        forward(e, e.context(["a"], 2))
    assert e.holder.current is None
