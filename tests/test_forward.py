"""The Ray-free parts of the multi-replica front (server.forward, server.commands.serve_ray): the routing key a body
gives, one HTTP request run through an in-process ASGI app (server.http's own included), and serve-ray's settings.
The Ray application itself runs in tests/test_ray_serve.py (slow tier)."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from adalora.config import ConfigError
from adalora.server.commands.serve_ray import RayOptions, settings_from_mapping
from adalora.server.config import ServerConfig
from adalora.server.forward import Head, HttpCall, exchange, route_key
from adalora.server.gate import Gate
from adalora.server.http import HttpApi
from adalora.server.metrics import Metrics

BASE = "smol"


@pytest.mark.parametrize("body, key", [
    (b'{"model": "a1", "prompt": "x"}', "a1"),
    (b'{"model": "smol", "prompt": "x"}', ""),  # the base model: any replica
    (b'{"model": "smol", "adapters": {"a1": 0.2, "b2": -0.7}}', "b2"),  # a mix: its heaviest adapter by |weight|
    (b'{"model": "smol", "adapters": {"b2": 0.5, "a1": 0.5}}', "a1"),  # a tie: the smallest id
    (b'{"model": "smol", "adapters": {"a1": "x", "b2": true}}', ""),  # no numeric weight: the route refuses it
    (b'{"model": "smol", "adapters": {}}', ""),
    (b'{"lora_name": "a3", "lora_path": "a3"}', "a3"),  # /v1/load_lora_adapter warms the replica Serve picks
    (b'{"model": "../etc/passwd"}', ""),  # not a store id: never a routing key
    (b'{"model": "A1"}', ""),
    (b'{"model": 7}', ""),
    (b'["a1"]', ""),
    (b"{not json", ""),
    (b"\xff\xfe", ""),
    (b"", ""),
])
def test_route_key(body, key):
    assert route_key(body, BASE) == key


async def _items(app, call: HttpCall) -> list:
    return [part async for part in exchange(app, call, [(b"x-extra", b"1")])]


def _toy_app() -> Starlette:
    async def echo(request):
        return JSONResponse({"method": request.method, "query": request.url.query, "body": (await request.body()).decode(),
                             "auth": request.headers.get("authorization")}, status_code=201)

    async def chunks(request):
        async def parts():
            for i in range(3):
                yield f"data: {i}\n\n"
        return StreamingResponse(parts(), media_type="text/event-stream")

    async def broken(request):
        raise RuntimeError("boom")

    return Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/chunks", chunks),
                             Route("/broken", broken)])


def test_exchange_carries_method_query_headers_and_body_and_adds_headers():
    call = HttpCall("POST", "/echo", b"a=1", ((b"authorization", b"Bearer k"),), b"hello")
    [head] = asyncio.run(_items(_toy_app(), call))
    assert isinstance(head, Head) and head.status == 201
    assert json.loads(head.body) == {"method": "POST", "query": "a=1", "body": "hello", "auth": "Bearer k"}
    assert (b"x-extra", b"1") in head.headers


def test_exchange_streams_the_body_after_the_head():
    parts = asyncio.run(_items(_toy_app(), HttpCall("GET", "/chunks")))
    assert isinstance(parts[0], Head) and parts[0].body == b"data: 0\n\n"
    assert b"".join(p for p in parts[1:] if isinstance(p, bytes)) == b"data: 1\n\ndata: 2\n\n"


def test_exchange_of_an_app_error_is_starlettes_500():
    [head] = asyncio.run(_items(_toy_app(), HttpCall("GET", "/broken")))
    assert head.status == 500


def test_closing_the_exchange_early_tells_the_app_the_client_left():
    left = asyncio.Event()

    async def app(scope, receive, send):
        await receive()  # the body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        if (await receive())["type"] == "http.disconnect":
            left.set()
        await asyncio.sleep(3600)  # cancelled, not waited for

    async def run() -> bool:
        stream = exchange(app, HttpCall("GET", "/"))
        head = await anext(stream)
        assert head.body == b"first"
        await stream.aclose()
        return left.is_set()

    assert asyncio.run(asyncio.wait_for(run(), 10))


def test_exchange_runs_server_http_routes(tmp_path):
    """The real HttpApi, as a replica runs it: no backend attached yet, so /health is 503 and a /v1 route answers
    OpenAI's error shape with 503."""
    config = ServerConfig(base_model=str(tmp_path), adapter_dir=str(tmp_path))
    api = HttpApi(config, Gate(), Metrics(config.max_slots, config.max_batch_size))
    [health] = asyncio.run(_items(api.app, HttpCall("GET", "/health")))
    assert (health.status, health.body) == (503, b"NOT_SERVING\n")
    [models] = asyncio.run(_items(api.app, HttpCall("GET", "/v1/models")))
    assert models.status == 503 and "still loading" in json.loads(models.body)["error"]["message"]
    body = b'{"model": "x", "prompt": "hi", "max_tokens": "many"}'
    [bad] = asyncio.run(_items(api.app, HttpCall("POST", "/v1/completions", body=body,
                                                  headers=((b"content-type", b"application/json"),))))
    assert bad.status == 400 and json.loads(bad.body)["error"]["param"] == "max_tokens"


# ---- serve-ray's settings ---------------------------------------------------------------------------------------

def test_settings_from_mapping_builds_the_replica_config_and_ray_options(tmp_path):
    config, options = settings_from_mapping({"base_model": str(tmp_path / "b"), "adapter_dir": str(tmp_path),
                                             "replicas": 3, "preload": ["a", "b"], "max_batch_size": 4,
                                             "max_slots": 5, "grace": 7, "device": "cuda", "dtype": "bfloat16"})
    assert (config.base_model, config.preload, config.max_slots, config.grace_s) == (str(tmp_path / "b"),
                                                                                    ("a", "b"), 5, 7.0)
    assert config.http_port is None and config.metrics_port is None  # the replicas open no ports of their own
    assert options == RayOptions(replicas=3, gpus_per_replica=1.0)  # a cuda device reserves a GPU per replica
    deployment = options.deployment_options(config)
    assert deployment == {"ray_actor_options": {"num_cpus": 1.0, "num_gpus": 1.0}, "max_ongoing_requests": 8,
                          "graceful_shutdown_timeout_s": 7.0, "num_replicas": 3}


def test_autoscaling_options_replace_the_fixed_count(tmp_path):
    config, options = settings_from_mapping({"base_model": str(tmp_path), "adapter_dir": str(tmp_path),
                                             "min_replicas": 1, "max_replicas": 4, "max_ongoing_requests": 3})
    deployment = options.deployment_options(config)
    assert "num_replicas" not in deployment and deployment["max_ongoing_requests"] == 3
    assert deployment["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4,
                                                "target_ongoing_requests": config.max_batch_size}
    assert deployment["ray_actor_options"]["num_gpus"] == 0.0  # cpu


@pytest.mark.parametrize("values, flag", [
    ({"replicas": 0}, "--replicas"),
    ({"min_replicas": 1}, "--max-replicas"),
    ({"min_replicas": 3, "max_replicas": 2}, "--min-replicas"),
    ({"cpus_per_replica": -1}, "--cpus-per-replica"),
    ({"max_ongoing_requests": 0}, "--max-ongoing-requests"),
    ({"tls_cert": "x.pem"}, "--tls-cert"),  # not a serve-ray flag: the one endpoint is Serve's proxy
    ({"replicas": "two"}, "--replicas"),
    ({"max_slots": 0}, "max_slots"),  # ServerConfig's own check
])
def test_bad_settings_name_the_flag(tmp_path, values, flag):
    with pytest.raises(ConfigError, match=flag):
        settings_from_mapping({"base_model": str(tmp_path), "adapter_dir": str(tmp_path), **values})
