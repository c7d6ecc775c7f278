"""Generator.cancel and request deadlines: a cancelled request leaves the queue or frees its row at the next step
boundary, an expired waiting request is dropped unrun, and the requests left in the batch produce exactly the
tokens they produce alone."""

import time

import pytest

from adalora.engine.errors import DeadlineExpired, RequestCancelled
from tests.test_engine_generate import greedy, generator, setup  # noqa: F401 - setup is a fixture

OTHERS = [([3, 17, 9, 40], "a", 10), ([12, 13], "b", 8), ([8, 1, 30], None, 9)]
"""Requests that keep running beside the cancelled or expired one."""


def alone(setup, prompt, adapter, n) -> list[int]:
    gen = generator(setup, max_batch_size=1)
    handle = gen.submit(greedy(prompt, adapter, n))
    while gen.has_work():
        gen.step()
    return handle.result.token_ids


def run(gen) -> int:
    steps = 0
    while gen.has_work():
        gen.step()
        steps += 1
    return steps


# (cancel after this many steps: 0 = while still waiting, the victim's adapter)
CANCEL_CASES = [(0, "a"), (1, "b"), (3, None), (5, "c")]


@pytest.mark.parametrize("after, adapter", CANCEL_CASES)
def test_cancel_frees_the_row_at_the_next_step_and_others_are_unchanged(setup, after, adapter):
    gen = generator(setup, max_batch_size=4)
    victim = gen.submit(greedy([5, 9, 13], adapter, 20))
    others = [gen.submit(greedy(*o)) for o in OTHERS]
    for _ in range(after):
        gen.step()
    tokens_before = len(victim.tokens)
    gen.cancel(victim)
    finished = gen.step()
    assert victim in finished
    assert isinstance(victim.error, RequestCancelled) and victim.result is None
    assert len(victim.tokens) == tokens_before == (after + 1 if after else 0)  # the first step: prefill + decode
    assert all(r.handle is not victim for r in gen._rows) and victim not in gen._waiting
    run(gen)
    for handle, (prompt, adapter_, n) in zip(others, OTHERS, strict=True):
        assert handle.result.token_ids == alone(setup, prompt, adapter_, n)


def test_cancel_of_a_finished_request_changes_nothing(setup):
    gen = generator(setup)
    handle = gen.submit(greedy([4, 5], "a", 3))
    run(gen)
    result = handle.result
    gen.cancel(handle)
    assert not gen.has_work() and gen.step() == [] and handle.result == result and handle.error is None


# (deadline relative to submit in seconds, whether it runs)
DEADLINE_CASES = [(-1.0, False), (0.0, False), (None, True), (60.0, True)]


@pytest.mark.parametrize("deadline, runs", DEADLINE_CASES)
def test_an_expired_waiting_request_is_dropped_unrun(setup, deadline, runs):
    gen = generator(setup, max_batch_size=4)
    at = None if deadline is None else time.monotonic() + deadline
    handle = gen.submit(greedy([5, 9, 13], "a", 4), deadline=at)
    others = [gen.submit(greedy(*o)) for o in OTHERS]
    finished = gen.step()
    assert handle in finished if not runs else handle not in finished
    if runs:
        assert handle.tokens and handle.error is None
    else:
        assert isinstance(handle.error, DeadlineExpired) and handle.tokens == []
        assert gen.running == len(OTHERS)  # it never took a row
    run(gen)
    for h, (prompt, adapter, n) in zip(others, OTHERS, strict=True):
        assert h.result.token_ids == alone(setup, prompt, adapter, n)


def test_a_request_expires_while_queued_behind_a_full_batch(setup):
    gen = generator(setup, max_batch_size=1)
    first = gen.submit(greedy([3, 4], "a", 6))
    late = gen.submit(greedy([5, 6], "b", 6), deadline=time.monotonic() + 0.05)
    gen.step()
    time.sleep(0.1)
    run(gen)
    assert first.result is not None and isinstance(late.error, DeadlineExpired) and late.tokens == []
