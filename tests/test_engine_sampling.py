"""Each logits transform against a naive per-token loop; SamplingParams validation messages."""

import math

import pytest
import torch

from adalora.engine.errors import InvalidRequest
from adalora.engine.sampling import (SamplingParams, next_token, repetition_penalty, request_generator,
                                             temperature, top_k, top_p)

V = 40


def logits_for(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, generator=g) * 3


def naive_penalty(logits, seen, p):
    out = logits.tolist()
    for t in set(seen.tolist()):
        out[t] = out[t] * p if out[t] < 0 else out[t] / p
    return torch.tensor(out)


def naive_top_k(logits, k):
    if k == 0:
        return logits
    vals = logits.tolist()
    return torch.tensor([v if sum(w > v for w in vals) < k else -math.inf for v in vals])


def naive_top_p(logits, p):
    probs = torch.softmax(logits, -1).tolist()
    order = sorted(range(V), key=lambda i: -probs[i])
    keep, mass = set(), 0.0
    for i in order:
        if mass >= p:
            break
        keep.add(i)
        mass += probs[i]
    return torch.tensor([v if i in keep else -math.inf for i, v in enumerate(logits.tolist())])


# (name, transform under test, naive reference), each run over several seeds and parameters
TRANSFORMS = [
    ("penalty", lambda l, a: repetition_penalty(l, torch.tensor([3, 7, 7, 0, 39]), a),
     lambda l, a: naive_penalty(l, torch.tensor([3, 7, 7, 0, 39]), a), (0.5, 1.0, 1.3, 2.0)),
    ("temperature", temperature, lambda l, a: torch.tensor([v / a for v in l.tolist()]), (0.3, 1.0, 2.5)),
    ("top_k", top_k, naive_top_k, (0, 1, 5, V - 1, V)),
    ("top_p", top_p, naive_top_p, (0.05, 0.5, 0.9, 0.999, 1.0)),
]


@pytest.mark.parametrize("name,transform,reference,args", TRANSFORMS, ids=[t[0] for t in TRANSFORMS])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_transform_matches_naive_loop(name, transform, reference, args, seed):
    logits = logits_for(seed)
    for a in args:
        torch.testing.assert_close(transform(logits.clone(), a), reference(logits, a), atol=1e-6, rtol=1e-6,
                                   msg=f"{name}({a})")


def test_top_k_and_top_p_keep_at_least_one_token():
    logits = logits_for(5)
    assert torch.isfinite(top_k(logits, 1)).sum() == 1
    assert torch.isfinite(top_p(logits, 1e-9)).sum() == 1
    assert torch.isfinite(top_p(logits, 1e-300)).sum() == 1  # below float32: it rounded to 0 and dropped every token


def test_greedy_is_argmax_after_penalty_and_seeded_draws_repeat():
    logits = logits_for(3)
    seen = torch.tensor([int(logits.argmax())])
    greedy = SamplingParams(temperature=0, repetition_penalty=1e6)
    assert next_token(logits, seen, greedy, request_generator(0)) == int(naive_penalty(logits, seen, 1e6).argmax())
    params = SamplingParams(temperature=1.5, top_k=10, top_p=0.9, seed=4)
    draws = [[next_token(logits, seen, params, g) for _ in range(20)]
             for g in (request_generator(4), request_generator(4))]
    assert draws[0] == draws[1] and len(set(draws[0])) > 1
    allowed = torch.isfinite(top_p(top_k(temperature(logits, 1.5), 10), 0.9)).nonzero().flatten().tolist()
    assert set(draws[0]) <= set(allowed)


# (field values, fragment of the error message)
INVALID = [
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be an integer >= 1"),
    (dict(max_new_tokens=True), "max_new_tokens must be an integer >= 1"),
    (dict(temperature=-0.1), "temperature must be >= 0 (0 = greedy)"),
    (dict(temperature=float("nan")), "temperature must be >= 0"),
    (dict(top_k=-1), "top_k must be an integer >= 0 (0 = no limit)"),
    (dict(top_k=1.5), "top_k must be an integer >= 0"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1.2), "top_p must be in (0, 1]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be > 0"),
    (dict(stop="###"), "stop must be a tuple of stop sequences"),
    (dict(stop=[[1, 2]]), "stop must be a tuple of stop sequences"),
    (dict(stop=("",)), "stop[0] is an empty string"),
    (dict(stop=((1,), ())), "stop[1] must be a non-empty string or a non-empty sequence of token ids"),
    (dict(stop=((1, -2),)), "stop[0] token ids must be non-negative integers"),
    (dict(stop=(5,)), "stop[0] must be a non-empty string or a non-empty sequence"),
    (dict(seed=-1), "seed must be a non-negative integer or None"),
    (dict(seed=2**64), "at most 2**64 - 1; got 18446744073709551616"),
    (dict(seed="7"), "seed must be a non-negative integer or None"),
]


@pytest.mark.parametrize("fields,message", INVALID, ids=[str(f) for f, _ in INVALID])
def test_invalid_sampling_params(fields, message):
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(**fields)
    assert message in str(info.value)


def test_stop_lists_become_tuples():
    params = SamplingParams(stop=([1, 2], "end"))
    assert params.stop_ids() == ((1, 2),) and params.stop_strings() == ("end",)
