"""The OpenAI HTTP API through the real `openai` package, on a tiny random Llama with 8 adapters: completions and chat,
streamed and not, concurrently for every adapter, a mix and the base, each equal to the in-process Generator running
that request alone; /v1/models; vLLM's load / unload routes and their store-only paths; every error status raised
as the SDK's own typed error; a stream closed early frees its row; metrics names under OpenMetrics."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import openai
import pytest

from adalora.engine import SamplingParams
from adalora.server.config import ServerConfig
from tests.factories import random_adapter, varied_llama
from tests.server_setup import generate_alone, ServerThread, until, word_tokenizer, write_base, write_store

IDS = [f"ad-{i}" for i in range(8)]
MIX = {"ad-1": 0.5, "ad-6": 0.7}
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant{% endif %}")
BASE = "tiny-base"
API_KEY, ADMIN = "test-key", "test-admin"


def chat_tokenizer():
    tokenizer = word_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("http")
    base, tokenizer = varied_llama(), chat_tokenizer()
    adapters = {adapter_id: random_adapter(base, 10 + i, init_r=2 + i % 3) for i, adapter_id in enumerate(IDS)}
    spare = {"spare": random_adapter(base, 50)}
    broken = {"broken": lambda folder: (folder.mkdir(), (folder / "adapter_config.json").write_text("[1, 2]"))}
    config = ServerConfig(base_model=str(write_base(base, root / "base", tokenizer)),
                          adapter_dir=str(write_store(root / "adapters", {**adapters, **spare, **broken})),
                          preload=tuple(adapters), port=0, http_port=0, served_model_name=BASE, max_batch_size=4,
                          max_slots=12, max_prompt_tokens=20, max_new_tokens=24, default_max_new_tokens=6)
    server = ServerThread(config)
    yield server, base, {**adapters, **spare}, tokenizer
    server.stop()


def client_of(server: ServerThread, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server.http_port}/v1", api_key=key, max_retries=0,
                         timeout=60)


def reference(setup, prompt_ids, adapter, params: SamplingParams) -> tuple[list[int], str]:
    """The request alone on an in-process Generator over the same base and adapters."""
    _, base, adapters, tokenizer = setup
    return generate_alone(base, adapters, tokenizer, prompt_ids, adapter, params)


def ids_of(tokenizer, prompt) -> list[int]:
    return tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)


def chat_ids(tokenizer, messages) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


def selection(model: str, extra: dict):
    return extra.get("adapters") or (None if model == BASE else model)


# (model, prompt, max_tokens, extra body): every adapter, a mix, the base
CASES = [
    *[(adapter_id, "w5 w9 w13 w7", 8, {}) for adapter_id in IDS],
    (BASE, [11, 30, 5, 6, 40], 7, {"adapters": MIX}),
    (BASE, "w20 w21", 5, {}),
]


def complete(client: openai.OpenAI, model, prompt, max_tokens, extra, stream: bool) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of one greedy completion, streamed or not."""
    kwargs = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=extra or None)
    if not stream:
        reply = client.completions.create(**kwargs)
        return reply.choices[0].text, reply.choices[0].finish_reason, reply.usage.completion_tokens
    text, finish, usage = "", None, None
    for chunk in client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    return text, finish, usage


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_concurrent_completions_equal_the_in_process_generator(setup, stream):
    server, *_, tokenizer = setup
    client = client_of(server)
    with ThreadPoolExecutor(len(CASES)) as pool:
        replies = list(pool.map(lambda case: complete(client, *case, stream), CASES))
    for (model, prompt, max_tokens, extra), (text, finish, n) in zip(CASES, replies):
        tokens, expected = reference(setup, ids_of(tokenizer, prompt), selection(model, extra),
                                     SamplingParams(max_tokens, temperature=0))
        assert (text, n) == (expected, len(tokens)), (model, extra)
        assert finish == ("length" if len(tokens) == max_tokens else "stop")


def test_ignore_eos_makes_max_tokens_and_equals_the_reference(setup):
    server, *_, tokenizer = setup
    text, finish, n = complete(client_of(server), "ad-1", "w5 w9", 12, {"ignore_eos": True}, stream=False)
    tokens, expected = reference(setup, ids_of(tokenizer, "w5 w9"), "ad-1",
                                 SamplingParams(12, temperature=0, ignore_eos=True))
    assert (text, n, finish) == (expected, 12, "length") and len(tokens) == 12


CHAT = [{"role": "system", "content": "w40"}, {"role": "user", "content": [{"type": "text", "text": "w9 w10"}]}]


@pytest.mark.parametrize("model", ["ad-3", BASE])
def test_chat_renders_the_template_and_equals_the_reference(setup, model):
    server, *_, tokenizer = setup
    client = client_of(server)
    rendered = [{"role": "system", "content": "w40"}, {"role": "user", "content": "w9 w10"}]
    tokens, expected = reference(setup, chat_ids(tokenizer, rendered), None if model == BASE else model,
                                 SamplingParams(6, temperature=0))
    reply = client.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=6, temperature=0)
    assert reply.choices[0].message.content == expected and reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(chat_ids(tokenizer, rendered))
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=6, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_chat_on_a_model_without_a_chat_template_is_400(setup):
    server, *_ = setup
    tokenizer = server.backend.tokenizer
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(openai.BadRequestError, match="has no chat template; use /v1/completions"):
            client_of(server).chat.completions.create(model="ad-1", messages=CHAT, max_tokens=2)
    finally:
        tokenizer.chat_template = template


def test_n_prompts_and_choices_are_indexed_prompt_major_and_seeded_per_choice(setup):
    server, *_, tokenizer = setup
    reply = client_of(server).completions.create(model="ad-2", prompt=["w5 w6", "w7"], n=2, max_tokens=4,
                                                 temperature=0.9, seed=11)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    for i, choice in enumerate(reply.choices):
        prompt, j = ["w5 w6", "w7"][i // 2], i % 2
        _, expected = reference(setup, ids_of(tokenizer, prompt), "ad-2",
                                SamplingParams(4, temperature=0.9, seed=11 + j))
        assert choice.text == expected
    assert reply.usage.prompt_tokens == 3


def test_a_stop_sequence_is_left_out_of_the_text_streamed_or_not(setup):
    server, *_, tokenizer = setup
    client = client_of(server)
    _, full = reference(setup, ids_of(tokenizer, "w5 w9 w13 w7"), "ad-0", SamplingParams(8, temperature=0))
    stop = full.split(" ")[2]  # the third word: the text must end before it
    expected = full[:full.index(stop)]
    reply = client.completions.create(model="ad-0", prompt="w5 w9 w13 w7", max_tokens=8, temperature=0, stop=stop)
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == (expected, "stop")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="ad-0", prompt="w5 w9 w13 w7", max_tokens=8, temperature=0, stop=[stop], stream=True))
    assert streamed == expected


# ---- models and admin ------------------------------------------------------------------------------------------

def test_models_lists_the_base_and_every_stored_adapter(setup):
    server, *_ = setup
    client = client_of(server)
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {BASE, *IDS, "spare", "broken"}
    assert models[BASE].parent is None and all(models[i].parent == BASE for i in (*IDS, "spare"))
    assert [models[i].loaded for i in IDS] == [True] * 8
    assert client.models.retrieve("ad-4").id == "ad-4" and client.models.retrieve(BASE).id == BASE
    with pytest.raises(openai.NotFoundError, match="not in the store"):
        client.models.retrieve("missing")


def admin_post(client: openai.OpenAI, route: str, body: dict) -> str:
    return client.post(route, body=body, cast_to=httpx2.Response).text


def test_load_and_unload_lora_adapter_in_vllms_shape(setup):
    server, *_ = setup
    client, store = client_of(server), Path(server.config.adapter_dir)
    assert "added" in admin_post(client, "/load_lora_adapter", {"lora_name": "spare",
                                                                "lora_path": str(store / "spare")})
    assert {m.id: m.loaded for m in client.models.list().data}["spare"] is True
    assert "already loaded" in admin_post(client, "/load_lora_adapter", {"lora_name": "spare", "lora_path": "spare"})
    assert "removed" in admin_post(client, "/unload_lora_adapter", {"lora_name": "spare"})
    assert {m.id: m.loaded for m in client.models.list().data}["spare"] is False


LORA_PATHS = [  # (lora_path, message): a client never reaches a folder outside the store
    ("../base", "not a folder of this server's adapter store"),
    ("/etc", "not a folder of this server's adapter store"),
    ("ad-1", "names store adapter 'ad-1' but lora_name is 'spare'"),
    ("spare/../../base", "not a folder of this server's adapter store"),
]


@pytest.mark.parametrize("path, message", LORA_PATHS)
def test_a_lora_path_outside_the_store_or_naming_another_id_is_refused(setup, path, message):
    server, *_ = setup
    with pytest.raises(openai.BadRequestError, match=message):
        admin_post(client_of(server), "/load_lora_adapter", {"lora_name": "spare", "lora_path": path})


# ---- errors through the SDK ------------------------------------------------------------------------------------

ERRORS = [  # (kwargs of completions.create, SDK error, message fragment)
    ({"model": "nope"}, openai.NotFoundError, "'nope' is not in the store"),
    ({"model": "Org/Model-7B"}, openai.NotFoundError, f"ask for '{BASE}'"),
    ({"logprobs": 2}, openai.BadRequestError, "logprobs are not supported"),
    ({"extra_body": {"frobnicate": 1}}, openai.BadRequestError, "unknown parameter(s) frobnicate"),
    ({"temperature": -1}, openai.BadRequestError, "temperature"),
    ({"max_tokens": 25}, openai.BadRequestError, "over this server's cap of 24"),
    ({"n": 0}, openai.BadRequestError, "n:"),
    ({"prompt": " ".join(["w5"] * 21)}, openai.BadRequestError, "21 tokens, over this server's limit of 20"),
    ({"prompt": []}, openai.BadRequestError, "empty list"),
    ({"prompt": [99999]}, openai.BadRequestError, "token ids must be integers in [0, 64)"),
    ({"extra_body": {"adapters": {"ad-1": 0.5}}}, openai.BadRequestError, "names the base"),
    ({"model": "broken"}, openai.UnprocessableEntityError, "broken"),
]


@pytest.mark.parametrize("kwargs, error, message", ERRORS, ids=[e[2][:30] for e in ERRORS])
def test_each_refusal_is_the_sdks_typed_error_with_a_message(setup, kwargs, error, message):
    server, *_ = setup
    args = {"model": "ad-0", "prompt": "w5 w6", "max_tokens": 2, **kwargs}
    with pytest.raises(error) as info:
        client_of(server).completions.create(**args)
    body = info.value.body
    assert message in body["message"] and body["type"], body
    assert "Traceback" not in body["message"] and server.config.adapter_dir not in body["message"]


def error_of(call) -> openai.APIStatusError:
    try:
        call()
    except openai.APIStatusError as error:
        return error
    raise AssertionError("the call succeeded, but an error status was expected")


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    """A server with an API key, an admin token, one batch row, a queue of one, a 1 s request deadline and 16 KiB
    bodies."""
    root = tmp_path_factory.mktemp("strict")
    base = varied_llama()
    config = ServerConfig(base_model=str(write_base(base, root / "base", chat_tokenizer())),
                          adapter_dir=str(write_store(root / "adapters", {"a": random_adapter(base, 1)})),
                          preload=("a",), port=0, http_port=0, api_key=API_KEY, admin_token=ADMIN, max_batch_size=1,
                          max_queue=1, http_timeout_s=1.0, max_message_bytes=16384, max_new_tokens=24,
                          default_max_new_tokens=8)
    server = ServerThread(config)
    yield server
    server.stop()


def test_the_api_key_guards_v1_and_the_admin_token_guards_admin_routes(strict):
    with pytest.raises(openai.AuthenticationError, match="needs an API key"):
        client_of(strict, "wrong").completions.create(model="a", prompt="w5", max_tokens=1)
    assert client_of(strict, API_KEY).completions.create(model="a", prompt="w5", max_tokens=1).choices
    with pytest.raises(openai.PermissionDeniedError, match="not this server's admin token"):
        admin_post(client_of(strict, API_KEY), "/load_lora_adapter", {"lora_name": "a"})
    assert "already loaded" in admin_post(client_of(strict, ADMIN), "/load_lora_adapter", {"lora_name": "a"})
    with urllib.request.urlopen(f"http://127.0.0.1:{strict.server.http_port}/health", timeout=10) as reply:
        assert reply.status == 200  # probes need no key


def test_a_body_over_the_limit_is_413(strict):
    with pytest.raises(openai.APIStatusError) as info:
        client_of(strict, API_KEY).completions.create(model="a", prompt="w5 " * 6000, max_tokens=1)
    assert info.value.status_code == 413 and "16384 bytes" in info.value.message


def test_a_full_queue_is_429_with_retry_after_and_a_deadline_is_504(strict):
    client, generator = client_of(strict, API_KEY), strict.backend.generator
    with ThreadPoolExecutor(1) as pool, strict.backend.lock:  # no step runs: the first request waits in the queue
        waiting = pool.submit(error_of, lambda: client.completions.create(model="a", prompt="w5", max_tokens=2))
        assert until(lambda: generator.waiting == 1)
        with pytest.raises(openai.RateLimitError, match="--max-queue 1") as info:
            client.completions.create(model="a", prompt="w6", max_tokens=2)
        assert info.value.response.headers["retry-after"] == "1"
        error = waiting.result(30)  # its 1 s deadline passed while queued
    assert isinstance(error, openai.InternalServerError) and error.status_code == 504, error
    assert "deadline" in error.body["message"]
    assert until(lambda: generator.waiting == 0 and not generator.has_work())


def test_503_before_the_model_is_attached_and_while_draining(setup):
    server, *_ = setup
    gate = server.server.gate
    gate.draining = True
    try:
        with pytest.raises(openai.InternalServerError, match="shutting down") as info:
            client_of(server).completions.create(model="ad-0", prompt="w5", max_tokens=1)
        assert info.value.status_code == 503
        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(f"http://127.0.0.1:{server.server.http_port}/health", timeout=10)
        assert health.value.code == 503
    finally:
        gate.draining = False


# ---- streams and metrics ---------------------------------------------------------------------------------------

def test_a_stream_closed_early_frees_its_row_at_the_next_step(setup):
    server, *_ = setup
    backend = server.backend
    hooks, rows = backend.generator.hooks, []
    observe = hooks.on_decode

    def slow(n: int) -> None:  # 24 tokens would take over a second: only a cancel ends it sooner
        observe(n)
        rows.append(n)
        time.sleep(0.05)

    hooks.on_decode = slow
    try:
        stream = client_of(server).completions.create(model="ad-0", prompt="w5 w6", max_tokens=24, temperature=0,
                                                      stream=True)
        next(iter(stream))
        closed = time.monotonic()
        stream.close()
        assert until(lambda: not backend.generator.has_work() and not backend.residency.in_use(), timeout=10)
        assert time.monotonic() - closed < 1.0 and len(rows) < 23
        assert server.server.metrics.inflight.snapshot() == ([], [])
    finally:
        hooks.on_decode = observe


def scrape(url: str, accept: str | None) -> tuple[str, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return reply.read().decode(), reply.headers["Content-Type"]


@pytest.mark.parametrize("accept", [None, "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                    "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"])
def test_metrics_on_the_http_port_keep_vllm_names_in_every_format(setup, accept):
    server, *_ = setup
    text, content_type = scrape(f"http://127.0.0.1:{server.server.http_port}/metrics", accept)
    samples = {line.split(" ")[0].split("{")[0] for line in text.splitlines() if line and not line.startswith("#")}
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:gpu_cache_usage_perc",
                 "vllm:kv_cache_usage_perc", "vllm:lora_requests_info"):
        assert name in samples, (name, content_type)
    assert not any(s.startswith("vllm_") for s in samples)
    assert ("openmetrics" in content_type) == (accept is not None and "openmetrics" in accept)
    assert 'adalora_requests_total{adapter="ad-0",rpc="/v1/completions",status="OK"}' in text


def test_the_metrics_port_answers_404_off_its_two_paths(tmp_path):
    base = varied_llama()
    config = ServerConfig(base_model=str(write_base(base, tmp_path / "base", word_tokenizer())),
                          adapter_dir=str(write_store(tmp_path / "adapters", {"a": random_adapter(base, 1)})), port=0,
                          metrics_port=0)
    server = ServerThread(config)
    try:
        port = server.server.metrics_port
        text, content_type = scrape(f"http://127.0.0.1:{port}/metrics", "application/openmetrics-text; version=1.0.0")
        assert "vllm:num_requests_waiting 0.0" in text and "escaping=allow-utf-8" in content_type
        for path in ("/", "/v1/completions", "/metrics/x"):
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10)
            assert info.value.code == 404, path
        assert server.server.http_port is None  # ServerConfig's default: no HTTP API
    finally:
        server.stop()


def test_concurrent_streams_and_unary_calls_leave_nothing_held(setup):
    server, *_ = setup
    client = client_of(server)

    def stream_one(adapter_id: str) -> str:
        return "".join(c.choices[0].text for c in client.completions.create(
            model=adapter_id, prompt="w8 w9", max_tokens=5, temperature=0, stream=True))

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(stream_one, IDS))
    assert all(isinstance(t, str) for t in texts) and len(set(texts)) > 1  # adapters differ
    assert until(lambda: not server.backend.residency.in_use())


# (argv, ADALORA_API_KEY, expected (http_port, api_key, served_model_name, http_timeout_s))
HTTP_FLAGS = [
    ([], None, (8000, None, None, 600.0)),
    (["--http-port", "0", "--served-model-name", "m1", "--http-timeout", "5"], None, (0, None, "m1", 5.0)),
    (["--http-port", "off"], "env-key", (None, "env-key", None, 600.0)),
    (["--api-key", "flag-key"], "env-key", (8000, "flag-key", None, 600.0)),
]


@pytest.mark.parametrize("argv, env, expected", HTTP_FLAGS)
def test_http_flags(monkeypatch, argv, env, expected):
    import argparse

    from adalora.server.commands import serve as serve_command
    monkeypatch.delenv("ADALORA_API_KEY", raising=False)
    if env is not None:
        monkeypatch.setenv("ADALORA_API_KEY", env)
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    config = serve_command.config_from(parser.parse_args(["--base-model", "m", "--adapter-dir", "a", *argv]))
    assert (config.http_port, config.api_key, config.served_model_name, config.http_timeout_s) == expected
    assert config.model_name == (expected[2] or "m")


@pytest.mark.parametrize("fields, message", [
    ({"http_port": 70000}, "http_port must be in [0, 65535]"),
    ({"http_port": 50051}, "also the gRPC or metrics port"),
    ({"api_key": " k"}, "api_key must be a non-empty string"),
    ({"http_timeout_s": 0}, "http_timeout_s must be a number of seconds > 0"),
])
def test_bad_http_settings_are_refused(fields, message):
    from adalora.config import ConfigError
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ServerConfig(base_model="m", adapter_dir="a", **fields)


@pytest.mark.parametrize("body, message", [
    (b'{"model": "ad-0", "prompt": ', "the request body is not valid JSON"),
    (b'{"model": "ad-0"}', "prompt: Field required"),
    (b'[1, 2]', "Input should be a valid dictionary"),
    (b'{"model": "ad-0", "prompt": "w5", "ignore_eos": "yes"}', "ignore_eos: Input should be a valid boolean"),
])
def test_a_malformed_body_is_400_naming_what_is_wrong(setup, body, message):
    server, *_ = setup
    request = urllib.request.Request(f"http://127.0.0.1:{server.server.http_port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    error = json.loads(info.value.read())["error"]
    assert info.value.code == 400 and message in error["message"] and error["type"] == "invalid_request_error"


def test_a_changed_adapter_is_409_until_loaded_in_place(setup):
    import shutil

    from adalora.adapter_file import save_adapter
    server, base, *_ = setup
    client, folder = client_of(server), Path(server.config.adapter_dir) / "fresh"
    save_adapter(random_adapter(base, 70), folder)
    try:
        assert "added" in admin_post(client, "/load_lora_adapter", {"lora_name": "fresh"})
        save_adapter(random_adapter(base, 71), folder)  # a new version in the store
        with pytest.raises(openai.ConflictError, match="pass reload=true"):
            admin_post(client, "/load_lora_adapter", {"lora_name": "fresh"})
        assert "added" in admin_post(client, "/load_lora_adapter", {"lora_name": "fresh", "load_inplace": True})
    finally:
        admin_post(client, "/unload_lora_adapter", {"lora_name": "fresh"})
        shutil.rmtree(folder)
