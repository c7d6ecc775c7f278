"""The batch cache's select / concat against a naive per-row list of (real keys, real values), and the keyword the
model takes it under."""

import inspect

import torch
from transformers import DynamicCache, LlamaForCausalLM

from adalora.engine.kv import BatchKV, cache_argument, concat, prefill_inputs, select
from tests.conftest import tiny_llama_config

H, D, LAYERS = 2, 3, 2


def batch(lengths, seed):
    """A left-padded BatchKV of rows with `lengths` real tokens (random keys/values), and its naive rows."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    rows = [[(torch.randn(H, n, D, generator=g), torch.randn(H, n, D, generator=g)) for _ in range(LAYERS)]
            for n in lengths]
    layers = []
    for layer in range(LAYERS):
        k = torch.zeros(len(lengths), H, width, D)
        v = torch.zeros(len(lengths), H, width, D)
        for b, n in enumerate(lengths):
            k[b, :, width - n:], v[b, :, width - n:] = rows[b][layer]
        layers.append((k, v))
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    return BatchKV(DynamicCache(layers), mask, torch.tensor(lengths)), rows


def unpadded(kv):
    """The real (keys, values) of each row per layer, read back through the mask."""
    keep = kv.mask.bool()
    return [[(layer.keys[b][:, keep[b]], layer.values[b][:, keep[b]]) for layer in kv.cache.layers]
            for b in range(kv.rows)]


def same(a, b):
    return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for ra, rb in zip(a, b, strict=True)
               for x, y in zip(ra, rb, strict=True))


# (lengths, rows kept)
SELECT = [([5, 2, 7], [0, 1]), ([5, 2, 7], [2]), ([1, 1], [1, 0]), ([3, 9, 4, 2], [3, 0, 2])]


def test_select_keeps_rows_in_order_and_drops_unused_padding():
    for lengths, keep in SELECT:
        kv, rows = batch(lengths, 0)
        out = select(kv, keep)
        assert same(unpadded(out), [rows[i] for i in keep])
        assert out.mask.shape[1] == max(lengths[i] for i in keep)  # no column that only dropped rows used
        assert out.positions.tolist() == [lengths[i] for i in keep]
    assert select(batch([2], 0)[0], []) is None


# (lengths of the running batch, lengths of the joining one)
CONCAT = [([5, 2], [7]), ([6], [1, 3]), ([4, 4], [4])]


def test_concat_left_pads_to_the_longer_and_stacks_rows():
    for first, second in CONCAT:
        (a, rows_a), (b, rows_b) = batch(first, 1), batch(second, 2)
        out = concat(a, b)
        assert same(unpadded(out), rows_a + rows_b)
        assert out.mask.shape[1] == max(first + second) and out.positions.tolist() == first + second
    b, _ = batch([3], 3)
    assert concat(None, b) is b


def test_prefill_inputs_left_pad_with_positions_from_each_rows_start():
    ids, mask, positions = prefill_inputs([[7, 8, 9], [5]], torch.device("cpu"))
    assert ids.tolist() == [[7, 8, 9], [0, 0, 5]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]


class OlderCausalLM(torch.nn.Module):
    """The forward signature of transformers releases before `cache` (only past_key_values)."""

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=None):
        return input_ids


def test_the_cache_keyword_follows_the_forward_signature():
    modern = "cache" in inspect.signature(LlamaForCausalLM.forward).parameters
    assert cache_argument(LlamaForCausalLM(tiny_llama_config())) == ("cache" if modern else "past_key_values")
    assert cache_argument(OlderCausalLM()) == "past_key_values"
