"""Scheduling limits and admin auth over a real in-process server: a full queue is RESOURCE_EXHAUSTED at once and
accepts again once drained; a request whose deadline passes while queued never runs; a cancelled stream frees its
batch row within a step while another request goes on unchanged; LoadAdapter / UnloadAdapter need the bearer token
(missing: UNAUTHENTICATED, wrong: PERMISSION_DENIED) while the other RPCs stay open."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from adalora.config import ConfigError
from adalora.engine import GenerationRequest, Generator, GeneratorConfig, SamplingParams
from adalora.engine.errors import DeadlineExpired
from adalora.server.domain import GenerateCall
from adalora.server.client import AdaLoraClient, generate_request
from adalora.server.commands import serve
from adalora.server.config import ServerConfig
from adalora.server.gen.adalora.v1 import adalora_pb2 as pb
from tests.server_setup import (ServerThread, reference_engine, status_of, until, word_tokenizer, write_base,
                                write_store)
from tests.factories import varied_llama
from tests.factories import random_adapter

TOKEN = "s3cret-token"
MAX_QUEUE = 2
VICTIM = ([20, 21, 22], "a", 40)
OTHER = ([12, 13], "b", 40)
"""(prompt, adapter, max_new_tokens): both run to their length alone (checked), so neither ends by itself early."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    base = varied_llama()
    adapters = {"a": random_adapter(base, 1), "b": random_adapter(base, 2)}
    config = ServerConfig(base_model=str(write_base(base, root / "base", word_tokenizer())),
                          adapter_dir=str(write_store(root / "adapters", adapters)), preload=("a", "b"), port=0,
                          max_batch_size=2, max_queue=MAX_QUEUE, max_new_tokens=48, default_max_new_tokens=8,
                          admin_token=TOKEN)
    server = ServerThread(config)
    yield server, base, adapters
    server.stop()


def reference(setup, prompt, adapter, n):
    _, base, adapters = setup
    generator = Generator(reference_engine(base, adapters), GeneratorConfig(max_batch_size=1))
    handle = generator.submit(GenerationRequest(prompt, adapter, SamplingParams(n, temperature=0)))
    while generator.has_work():
        generator.step()
    return handle.result



def idle(server) -> bool:
    return until(lambda: not server.backend.generator.has_work() and not server.backend.residency.in_use())


# ---- bounded admission ---------------------------------------------------------------------------------------

REFUSED_CALLS = [
    ("Generate", lambda c: c.generate([5, 6], "a", max_new_tokens=2, temperature=0)),
    ("GenerateStream", lambda c: list(c.generate_stream([5, 6], "b", max_new_tokens=2, temperature=0))),
]


@pytest.mark.parametrize("rpc, call", REFUSED_CALLS, ids=[r for r, _ in REFUSED_CALLS])
def test_a_full_queue_refuses_at_once_and_accepts_again_once_drained(setup, rpc, call):
    server, *_ = setup
    generator = server.backend.generator
    with server.backend.lock:  # no step can run: every request stays waiting
        queued = [server.client.generate_stream([5, 6, 7], "a", max_new_tokens=3, temperature=0)
                  for _ in range(MAX_QUEUE)]
        assert until(lambda: generator.waiting == MAX_QUEUE)
        started = time.monotonic()
        code, details = status_of(lambda: call(server.client))
        elapsed = time.monotonic() - started
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, rpc
    assert f"--max-queue {MAX_QUEUE}" in details and "retry" in details
    assert elapsed < 5  # refused while the lock was held: nothing waited for a step
    for stream in queued:
        assert list(stream)[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
    assert idle(server)
    assert call(server.client)  # drained: accepted again


# ---- deadlines -------------------------------------------------------------------------------------------------

def test_a_request_whose_deadline_passes_in_the_queue_never_runs(setup):
    server, *_ = setup
    hooks, admitted = server.backend.generator.hooks, []
    observe = hooks.on_admit
    hooks.on_admit = lambda handle: (admitted.append(handle), observe(handle))
    try:
        with ThreadPoolExecutor(1) as pool, server.backend.lock:
            reply = pool.submit(status_of, lambda: server.client.stub.Generate(
                generate_request([5, 6], "a", max_new_tokens=4, temperature=0), timeout=0.3))
            assert until(lambda: server.backend.generator.waiting == 1)
            code, details = reply.result(30)  # the deadline passes while the lock holds every step
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert idle(server)
        assert admitted == []  # it never took a batch row
    finally:
        hooks.on_admit = observe


async def _drain(backend, call):
    return [event async for event in backend.generate(call)]


# (deadline relative to now, seconds the lock is held): already past at admission, or passing while queued
DEADLINE_CASES = [(-0.1, 0.0), (0.2, 0.5)]


@pytest.mark.parametrize("deadline, hold", DEADLINE_CASES)
def test_backend_drops_an_expired_request_with_deadline_exceeded(setup, deadline, hold):
    server, *_ = setup
    backend = server.backend
    call = GenerateCall((5, 6), "a", SamplingParams(4, temperature=0), deadline=time.monotonic() + deadline)
    with backend.lock:
        pending = asyncio.run_coroutine_threadsafe(_drain(backend, call), server.loop)
        time.sleep(hold)
    with pytest.raises(DeadlineExpired, match="deadline"):
        pending.result(30)
    assert idle(server)
    assert server.server.metrics.inflight.snapshot() == ([], [])


# ---- cancellation ----------------------------------------------------------------------------------------------

def test_a_cancelled_stream_frees_its_row_within_a_step_and_the_other_request_is_unchanged(setup):
    server, *_ = setup
    for request in (VICTIM, OTHER):
        assert reference(setup, *request).finish_reason == "length"  # precondition: neither ends early alone
    hooks = server.backend.generator.hooks
    observe, rows, lock = hooks.on_decode, [], threading.Lock()

    def slow(n: int) -> None:  # each decode step takes 20 ms, so the other request outlives the cancel
        observe(n)
        with lock:
            rows.append(n)
        time.sleep(0.02)

    hooks.on_decode = slow
    try:
        with ThreadPoolExecutor(1) as pool:
            victim = server.client.generate_stream(VICTIM[0], VICTIM[1], max_new_tokens=VICTIM[2], temperature=0)
            next(victim)
            other = pool.submit(server.client.generate, OTHER[0], OTHER[1], max_new_tokens=OTHER[2], temperature=0)
            assert until(lambda: 2 in rows)
            with lock:
                at_cancel = len(rows)
            victim.cancel()
            assert until(lambda: rows[-1] == 1, timeout=10)
            with lock:
                after = rows[at_cancel:]
            reply = other.result(30)
        assert after.count(2) <= 3, f"decode rows after the cancel: {after}"
        assert 1 in after[:after.count(2) + 1] and reply.finish_reason == pb.FINISH_REASON_LENGTH
        assert list(reply.token_ids) == reference(setup, *OTHER).token_ids
        assert idle(server)
        assert server.backend.residency.in_use() == {} and server.server.metrics.inflight.snapshot() == ([], [])
    finally:
        hooks.on_decode = observe


# ---- admin auth ------------------------------------------------------------------------------------------------

# (metadata sent, status of LoadAdapter / UnloadAdapter, fragment of the message)
AUTH_CASES = [
    ((), grpc.StatusCode.UNAUTHENTICATED, "authorization: Bearer"),
    ((("authorization", "Bearer nope"),), grpc.StatusCode.PERMISSION_DENIED, "not this server's admin token"),
    ((("authorization", f"Basic {TOKEN}"),), grpc.StatusCode.UNAUTHENTICATED, "authorization: Bearer"),
    ((("authorization", f"Bearer {TOKEN}x"),), grpc.StatusCode.PERMISSION_DENIED, "not this server's admin token"),
    ((("authorization", f"Bearer {TOKEN}"),), grpc.StatusCode.OK, ""),
    ((("authorization", f"bearer {TOKEN}"),), grpc.StatusCode.OK, ""),
]


@pytest.mark.parametrize("metadata, code, fragment", AUTH_CASES)
def test_admin_rpcs_need_the_bearer_token(setup, metadata, code, fragment):
    server, *_ = setup
    stub = server.client.stub
    calls = [lambda: stub.UnloadAdapter(pb.UnloadAdapterRequest(id="b"), timeout=30, metadata=metadata),
             lambda: stub.LoadAdapter(pb.LoadAdapterRequest(id="b"), timeout=30, metadata=metadata)]
    for call in calls:
        if code == grpc.StatusCode.OK:
            call()
            continue
        got, details = status_of(call)
        assert (got, fragment in details) == (code, True), details
    assert [a.id for a in server.client.list_adapters().adapters] == ["a", "b"]  # refused calls changed nothing


def test_open_rpcs_need_no_token_and_the_client_sends_it(setup):
    server, *_ = setup
    assert [a.id for a in server.client.list_adapters().adapters] == ["a", "b"]
    assert server.client.get_adapter("a").id == "a"
    assert server.client.generate([5, 6], "a", max_new_tokens=2, temperature=0).finish_reason
    with AdaLoraClient(server.target, timeout=30, admin_token=TOKEN) as admin:
        assert admin.unload_adapter("b").freed_bytes > 0
        assert not admin.load_adapter("b").already_loaded
    with AdaLoraClient(server.target, timeout=30, admin_token="wrong") as intruder:
        assert status_of(lambda: intruder.unload_adapter("b"))[0] == grpc.StatusCode.PERMISSION_DENIED


# ---- config and flags ------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    ({"max_queue": 0}, "max_queue must be a positive integer"),
    ({"max_queue": True}, "max_queue must be a positive integer"),
    ({"admin_token": ""}, "admin_token must be a non-empty string"),
    ({"admin_token": " x "}, "without surrounding whitespace"),
    ({"admin_token": 5}, "admin_token must be a non-empty string"),
]


@pytest.mark.parametrize("fields, message", BAD_CONFIGS)
def test_bad_limits_are_refused_once_with_a_fix(fields, message):
    with pytest.raises(ConfigError, match=message):
        ServerConfig(base_model="m", adapter_dir="a", **fields)


# (argv extra, environment token, expected max_queue, expected admin_token)
FLAG_CASES = [
    ([], None, ServerConfig(base_model="", adapter_dir="").max_queue, None),
    (["--max-queue", "7"], "from-env", 7, "from-env"),
    (["--admin-token", "from-flag"], "from-env", 256, "from-flag"),
]


@pytest.mark.parametrize("argv, env, max_queue, token", FLAG_CASES)
def test_flags_and_environment(monkeypatch, argv, env, max_queue, token):
    import argparse
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    if env is None:
        monkeypatch.delenv("ADALORA_ADMIN_TOKEN", raising=False)
    else:
        monkeypatch.setenv("ADALORA_ADMIN_TOKEN", env)
    config = serve.config_from(parser.parse_args(["--base-model", "m", "--adapter-dir", "a", *argv]))
    assert (config.max_queue, config.admin_token) == (max_queue, token)
