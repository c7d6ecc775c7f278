"""Adapter lifecycle over gRPC (load from the store, idempotent reload, replace, LRU eviction and pinning, unload,
describe) with the status code of every refusal, and health transitions (NOT_SERVING until the base model is
attached, and on drain)."""

import dataclasses
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2
from transformers import LlamaForCausalLM

from adalora.adapter_file import save_adapter, tensors_sha256, to_tensors
from adalora.server.adapter_checks import AdapterLimits
from adalora.server.config import ServerConfig
from adalora.server.gen.adalora.v1 import adalora_pb2 as pb
from tests.conftest import tiny_llama_config
from tests.server_setup import ServerThread, status_of, word_tokenizer, write_base, write_store
from tests.factories import varied_llama
from tests.factories import random_adapter

OK = grpc.StatusCode.OK


@pytest.fixture
def setup(tmp_path):
    base = varied_llama()
    config = tiny_llama_config()
    config.num_hidden_layers = 3  # another base: same module shapes, other identity
    alien = random_adapter(LlamaForCausalLM(config), 5)
    adapters = {"a": random_adapter(base, 1), "b": random_adapter(base, 2), "c": random_adapter(base, 3)}
    store = write_store(tmp_path / "adapters", {**adapters, "alien": alien})
    (store / "broken").mkdir()
    (store / "broken" / "adapter.safetensors").write_bytes(b"not a safetensors file")
    config = ServerConfig(base_model=str(write_base(base, tmp_path / "base", word_tokenizer())), adapter_dir=str(store),
                          port=0, max_slots=2, max_new_tokens=64)
    return config, base, adapters


def test_load_is_idempotent_replace_needs_reload_lru_evicts_and_pins_hold(setup):
    config, base, adapters = setup
    server = ServerThread(config)
    try:
        client = server.client
        first = client.load_adapter("a")
        assert not first.already_loaded and first.adapter.residency == pb.RESIDENCY_DEVICE
        again = client.load_adapter("a")
        assert again.already_loaded and again.adapter.version == first.adapter.version and again.load_ms == 0
        before = client.generate([5, 6, 7], "a", max_new_tokens=6, temperature=0).token_ids

        save_adapter(adapters["c"], config.adapter_dir + "/a")  # a new version of 'a' in the store
        code, details = status_of(lambda: client.load_adapter("a"))
        assert code == grpc.StatusCode.ALREADY_EXISTS and "reload=true" in details
        replaced = client.load_adapter("a", reload=True)
        assert replaced.adapter.version != first.adapter.version and not replaced.already_loaded
        client.load_adapter("c")
        assert client.generate([5, 6, 7], "a", max_new_tokens=6, temperature=0).token_ids == \
            client.generate([5, 6, 7], "c", max_new_tokens=6, temperature=0).token_ids != before

        assert client.load_adapter("b").adapter.id == "b"  # 2 slots: 'a' (least recently used) makes room
        tiers = {a.id: a.residency for a in client.list_adapters().adapters}
        assert tiers == {"b": pb.RESIDENCY_DEVICE, "c": pb.RESIDENCY_DEVICE, "a": pb.RESIDENCY_HOST}
        assert client.load_adapter("b", pin=True).already_loaded and client.get_adapter("b").pinned
        client.load_adapter("c", pin=True)
        code, details = status_of(lambda: client.load_adapter("a"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "pinned" in details and "unload one" in details
        assert client.unload_adapter("c").freed_bytes > 0
        assert client.load_adapter("a").adapter.residency == pb.RESIDENCY_DEVICE
    finally:
        server.stop()


REFUSED = [("missing", grpc.StatusCode.NOT_FOUND, "not in the store"),
           ("Bad/Id", grpc.StatusCode.INVALID_ARGUMENT, "must match"),
           ("..", grpc.StatusCode.INVALID_ARGUMENT, "must match"),
           ("alien", grpc.StatusCode.FAILED_PRECONDITION, "load it into an engine over its own base"),
           ("broken", grpc.StatusCode.FAILED_PRECONDITION, "cannot be read")]


def test_refused_loads_change_nothing(setup):
    config, *_ = setup
    server = ServerThread(config)
    try:
        server.client.load_adapter("a")
        for adapter_id, code, fragment in REFUSED:
            got, details = status_of(lambda: server.client.load_adapter(adapter_id))
            assert got == code and fragment in details, (adapter_id, details)
        assert [a.id for a in server.client.list_adapters().adapters] == ["a"]
        code, details = status_of(lambda: server.client.unload_adapter("b"))
        assert code == grpc.StatusCode.NOT_FOUND and "not loaded" in details
    finally:
        server.stop()


def test_the_servers_adapter_limits_refuse_an_adapter_over_them(setup):
    config, _, adapters = setup
    cap = max(adapters["a"].ranks().values())  # 'a' fits exactly; 'b' keeps a higher rank somewhere
    top = max(adapters["b"].ranks().values())
    assert top > cap
    server = ServerThread(dataclasses.replace(config, adapter_limits=AdapterLimits(max_rank=cap)))
    try:
        code, details = status_of(lambda: server.client.load_adapter("b"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION, details
        assert f"has rank {top}, over the cap of {cap}" in details and "--max-adapter-rank" in details
        assert server.client.list_adapters().adapters == []
        assert server.client.load_adapter("a").adapter.id == "a"
    finally:
        server.stop()


def test_unload_while_requests_are_in_flight_lets_them_finish_on_it(setup):
    config, *_ = setup
    server = ServerThread(config)
    try:
        server.client.load_adapter("a")
        want = server.client.generate([5, 6], "a", max_new_tokens=20, temperature=0).token_ids
        residency = server.backend.residency
        with server.backend.lock:  # no engine step can run: the request stays in flight
            stream = server.client.generate_stream([5, 6], "a", max_new_tokens=20, temperature=0)
            deadline = time.monotonic() + 10
            while residency.device["a"].users == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.client.unload_adapter("a").freed_bytes > 0
            assert server.client.list_adapters().adapters == []  # no new request gets it
        got = [t for m in stream for t in m.token_ids]
        assert got == list(want)
        deadline = time.monotonic() + 10
        while server.backend.engine.slots.loaded() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.backend.engine.slots.loaded() == {} and not residency.retired  # freed once it finished
    finally:
        server.stop()


def test_describe_and_list(setup):
    config, base, adapters = setup
    server = ServerThread(config)
    try:
        server.client.load_adapter("b")
        info = server.client.get_adapter("b")
        adapter = adapters["b"]
        assert {r.module: r.rank for r in info.ranks} == adapter.ranks()
        assert info.sha256 == tensors_sha256(to_tensors(adapter)) and len(info.version) == 64
        assert (info.format, info.task_type, info.num_params, info.init_r) == \
            ("native", "causal-lm", adapter.num_params(), adapter.init_r)
        resident = server.backend.residency.device["b"]
        assert info.device_bytes == server.backend.engine.nbytes(resident.key) == resident.device_bytes > 0
        on_disk = server.client.get_adapter("c")
        assert on_disk.residency == pb.RESIDENCY_DISK and on_disk.device_bytes == 0 and on_disk.sha256
        listing = server.client.list_adapters(include_store=True)
        assert [(a.id, a.residency, a.format) for a in listing.adapters] == [
            ("b", pb.RESIDENCY_DEVICE, "native"), ("a", pb.RESIDENCY_DISK, "native"),
            ("alien", pb.RESIDENCY_DISK, "native"), ("broken", pb.RESIDENCY_DISK, ""),
            ("c", pb.RESIDENCY_DISK, "native")]
        assert listing.max_slots == 2
    finally:
        server.stop()


def test_health_not_serving_until_attached_and_on_drain(setup):
    config, *_ = setup
    server = ServerThread(config, attach=False)
    try:
        assert server.client.health() == server.client.health("adalora.v1.AdaLora") == "NOT_SERVING"
        code, details = status_of(lambda: server.client.generate([5], "a"))
        assert code == grpc.StatusCode.UNAVAILABLE and "still loading" in details
        watch = server.client.health_stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        server.attach()
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        assert server.client.health() == "SERVING"
        statuses = []
        reader = threading.Thread(target=lambda: statuses.extend(m.status for m in _until_closed(watch)))
        reader.start()
    finally:
        server.stop(grace=1)
    reader.join(10)
    assert statuses[:1] == [health_pb2.HealthCheckResponse.NOT_SERVING]


def test_an_open_health_watch_does_not_hold_the_drain(setup):
    config, *_ = setup
    server = ServerThread(config)
    watch = server.client.health_stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    seen, ended = [], []

    def read():
        try:
            seen.extend(m.status for m in watch)
            ended.append("OK")
        except grpc.RpcError as e:
            ended.append(e.code().name)

    reader = threading.Thread(target=read)
    reader.start()
    started = time.monotonic()
    server.stop(grace=30)  # nothing else in flight: the drain ends once the watch has been told
    assert time.monotonic() - started < 10
    reader.join(10)
    assert seen == [health_pb2.HealthCheckResponse.NOT_SERVING] and ended == ["OK"]


def _until_closed(stream):
    try:
        yield from stream
    except grpc.RpcError:
        return
