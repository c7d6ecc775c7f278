"""Adapter residency over a real in-process server (tiny random Llama, 2 device slots): a stored adapter loads on
demand and answers like the in-process reference; LRU eviction moves adapters device -> host -> disk; one load
however many requests wait, while requests for other adapters keep running; a reload under traffic is atomic
(every answer wholly old or wholly new); hot adapters cannot starve a rare one; pins, byte budgets and deadlines.
The store's reads are counted (and held, where a test needs a slow load) by wrapping the backend's store.read."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from adalora.adapter_file import save_adapter
from adalora.config import ConfigError
from adalora.engine import (AdapterEngine, EngineConfig, GenerationRequest, Generator, GeneratorConfig,
                                    SamplingParams)
from adalora.server.client import generate_request
from adalora.server.config import ServerConfig
from adalora.server.gen.adalora.v1 import adalora_pb2 as pb
from tests.server_setup import (ServerThread, reference_engine, status_of, until, word_tokenizer, write_base,
                                write_store)
from tests.factories import varied_llama
from tests.factories import random_adapter

PROMPT, NEW = [5, 9, 13, 7], 8
IDS = ("a", "b", "c", "d", "rare")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = varied_llama()
    adapters = {adapter_id: random_adapter(base, seed) for seed, adapter_id in enumerate(IDS, start=1)}
    adapters["a2"] = random_adapter(base, 99)  # a second version of 'a'
    folder = write_base(base, tmp_path_factory.mktemp("base"), word_tokenizer())
    generator = Generator(reference_engine(base, adapters), GeneratorConfig(max_batch_size=1))
    references = {}
    for adapter_id in adapters:
        handle = generator.submit(GenerationRequest(PROMPT, adapter_id, SamplingParams(NEW, temperature=0)))
        while generator.has_work():
            generator.step()
        references[adapter_id] = list(handle.result.token_ids)
    assert len({tuple(t) for t in references.values()}) == len(references)  # every adapter answers differently
    return base, adapters, folder, references


def start(models, tmp_path, **overrides) -> ServerThread:
    base, adapters, folder, _ = models
    store = write_store(tmp_path / "adapters", {i: adapters[i] for i in IDS})
    settings = dict(port=0, max_slots=2, max_new_tokens=32, default_max_new_tokens=8, max_batch_size=4) | overrides
    return ServerThread(ServerConfig(base_model=str(folder), adapter_dir=str(store), **settings))


class Reads:
    """Wraps the backend store's read: counts reads per id and can hold the reads of one id until opened."""

    def __init__(self, server: ServerThread, held: str | None = None) -> None:
        self.store, self.held = server.backend.store, held
        self.read, self.count, self.gate = self.store.read, {}, threading.Event()
        self.store.read = self

    def __call__(self, adapter_id):
        self.count[adapter_id] = self.count.get(adapter_id, 0) + 1
        if adapter_id == self.held:
            assert self.gate.wait(30)
        return self.read(adapter_id)


def ask(server: ServerThread, adapter, timeout: float = 60) -> list[int]:
    request = generate_request(PROMPT, adapter, max_new_tokens=NEW, temperature=0)
    return list(server.client.stub.Generate(request, timeout=timeout).token_ids)


def tiers(server: ServerThread) -> dict[str, int]:
    return {a.id: a.residency for a in server.client.list_adapters().adapters}



# ---- the engine's byte estimate ------------------------------------------------------------------------------

def test_footprint_equals_the_bytes_a_load_holds(models):
    base, adapters, *_ = models
    engine = AdapterEngine(base.__class__(base.config), EngineConfig(max_slots=len(adapters)))
    for adapter_id, adapter in adapters.items():
        engine.load(adapter_id, adapter)
        assert engine.footprint(adapter) == engine.nbytes(adapter_id) > 0, adapter_id


# ---- tiers ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("host_bytes,evicted_to", [(1024**3, pb.RESIDENCY_HOST), (0, pb.RESIDENCY_DISK)])
def test_on_demand_loads_answer_like_the_reference_and_lru_evicts(models, tmp_path, host_bytes, evicted_to):
    references = models[3]
    server = start(models, tmp_path, max_host_bytes=host_bytes)
    try:
        reads = Reads(server)
        for adapter_id in ("a", "b"):
            assert ask(server, adapter_id) == references[adapter_id]
        assert tiers(server) == {"a": pb.RESIDENCY_DEVICE, "b": pb.RESIDENCY_DEVICE}
        assert ask(server, "a") == references["a"]  # a hit: 'b' is now the least recently used
        assert ask(server, "c") == references["c"]
        listed = {a.id: a.residency for a in server.client.list_adapters(include_store=True).adapters}
        assert listed == {"a": pb.RESIDENCY_DEVICE, "c": pb.RESIDENCY_DEVICE, "b": evicted_to,
                          "d": pb.RESIDENCY_DISK, "rare": pb.RESIDENCY_DISK}
        assert ask(server, "b") == references["b"]  # back from the host tier, or from the disk again
        assert reads.count == {"a": 1, "b": 1 if evicted_to == pb.RESIDENCY_HOST else 2, "c": 1}
        assert server.client.get_adapter("b").residency == pb.RESIDENCY_DEVICE
        engine = server.backend.engine
        assert len(engine.slots.loaded()) == 2 and server.backend.residency.retired == set()
    finally:
        server.stop()


def test_one_load_however_many_wait_and_other_adapters_keep_running(models, tmp_path):
    references = models[3]
    server = start(models, tmp_path, max_slots=3, preload=("b",))
    try:
        reads = Reads(server, held="a")
        misses = lambda: server.server.metrics.registry.get_sample_value("adalora_adapter_cache_misses_total")  # noqa
        with ThreadPoolExecutor(8) as pool:
            waiting = [pool.submit(ask, server, "a") for _ in range(6)]
            assert until(lambda: reads.count.get("a") == 1)
            for _ in range(3):  # 'b' answers while 'a' is still being read
                assert ask(server, "b", timeout=20) == references["b"]
            assert not any(f.done() for f in waiting)
            reads.gate.set()
            assert [f.result(60) for f in waiting] == [references["a"]] * 6
        assert reads.count == {"a": 1} and misses() == 1
    finally:
        reads.gate.set()
        server.stop()


def test_an_upload_replaces_a_host_copy_but_not_a_device_version(models, tmp_path):
    _, adapters, _, references = models
    server = start(models, tmp_path)
    try:
        for adapter_id in ("a", "b", "c"):  # 'a' leaves for the host tier
            ask(server, adapter_id)
        assert tiers(server)["a"] == pb.RESIDENCY_HOST
        save_adapter(adapters["a2"], tmp_path / "new-a")
        save_adapter(adapters["b"], tmp_path / "new-c")
        server.client.upload("a", tmp_path / "new-a", overwrite=True)
        server.client.upload("c", tmp_path / "new-c", overwrite=True)
        assert "a" not in tiers(server)  # the stale host copy is gone: the disk holds the new version
        assert ask(server, "a") == references["a2"]
        assert ask(server, "c") == references["c"]  # on the device: the old version serves until a reload
        server.client.load_adapter("c", reload=True)
        assert ask(server, "c") == references["b"]
    finally:
        server.stop()


def test_a_deadline_passes_while_the_adapter_loads(models, tmp_path):
    references = models[3]
    server = start(models, tmp_path)
    try:
        reads = Reads(server, held="a")
        code, _ = status_of(lambda: ask(server, "a", timeout=0.5))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        reads.gate.set()
        assert ask(server, "a") == references["a"] and reads.count == {"a": 1}
    finally:
        reads.gate.set()
        server.stop()


# ---- versions ------------------------------------------------------------------------------------------------

def test_reload_under_traffic_is_atomic(models, tmp_path):
    _, adapters, _, references = models
    old, new = references["a"], references["a2"]
    server = start(models, tmp_path, preload=("a",))
    try:
        residency = server.backend.residency
        stop, answers = threading.Event(), []

        def traffic():
            while not stop.is_set():
                sent = time.monotonic()
                answers.append((sent, ask(server, "a")))

        with ThreadPoolExecutor(4) as pool:
            runners = [pool.submit(traffic) for _ in range(3)]
            assert until(lambda: len(answers) >= 3)
            with server.backend.lock:  # no step runs: every request now queued holds the old version
                stream = server.client.generate_stream(PROMPT, "a", max_new_tokens=NEW, temperature=0)
                assert until(lambda: residency.device["a"].users == 4)  # 3 runners + the stream
                save_adapter(adapters["a2"], tmp_path / "adapters" / "a")
                reloading = pool.submit(server.client.load_adapter, "a", reload=True)
                assert until(lambda: len(residency.residents()) == 1 and residency._room.locked())
            assert not reloading.result(60).already_loaded
            reloaded = time.monotonic()
            assert [t for m in stream for t in m.token_ids] == old  # started on the old version, ended on it
            assert until(lambda: sum(1 for sent, _ in answers if sent > reloaded) >= 3)
            stop.set()
            for runner in runners:
                runner.result(60)
        assert {tuple(tokens) for _, tokens in answers} <= {tuple(old), tuple(new)}  # never a mix of the two
        assert [tokens for sent, tokens in answers if sent > reloaded] == \
            [new] * sum(1 for sent, _ in answers if sent > reloaded)
        assert until(lambda: not residency.retired) and len(server.backend.engine.slots.loaded()) == 1
    finally:
        server.stop()


# ---- fairness, pins and budgets ------------------------------------------------------------------------------

def test_hot_adapters_cannot_starve_a_rare_one(models, tmp_path):
    references = models[3]
    server = start(models, tmp_path, max_batch_size=4)
    try:
        stop = threading.Event()

        def hot(adapter_id):
            while not stop.is_set():
                assert ask(server, adapter_id) == references[adapter_id]

        with ThreadPoolExecutor(10) as pool:  # 5 callers each: more than the 4 batch rows, so some always wait
            runners = [pool.submit(hot, i) for i in "ab" * 5]  # holding 'a' and 'b': neither is ever idle
            residency = server.backend.residency
            assert until(lambda: all(i in residency.device and residency.device[i].users >= 3 for i in "ab"))
            try:
                assert ask(server, "rare", timeout=20) == references["rare"]
            finally:
                stop.set()
            for runner in runners:
                runner.result(60)
    finally:
        server.stop()


def test_pinned_adapters_stay_and_a_device_of_pins_refuses_at_once(models, tmp_path):
    references = models[3]
    server = start(models, tmp_path, preload=("a", "b"))
    try:
        started = time.monotonic()
        code, details = status_of(lambda: ask(server, "c"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "pinned" in details and "a, b" in details
        assert time.monotonic() - started < 10
        assert all(a.pinned for a in server.client.list_adapters().adapters)
        server.client.unload_adapter("b")
        assert ask(server, "c") == references["c"]
        assert ask(server, "d") == references["d"]  # 'c' is not pinned: it makes room, 'a' stays
        assert tiers(server) == {"a": pb.RESIDENCY_DEVICE, "d": pb.RESIDENCY_DEVICE, "c": pb.RESIDENCY_HOST}
    finally:
        server.stop()


def test_device_byte_budget(models, tmp_path):
    _, adapters, _, references = models
    engine = AdapterEngine(models[0].__class__(models[0].config), EngineConfig(max_slots=1))
    sizes = {i: engine.footprint(adapters[i]) for i in IDS}
    server = start(models, tmp_path, max_slots=8, max_device_bytes=sizes["a"] + sizes["b"])
    try:
        assert ask(server, "a") == references["a"] and ask(server, "b") == references["b"]
        smaller = [i for i in ("c", "d", "rare") if sizes[i] <= min(sizes["a"], sizes["b"])]
        if smaller:  # fits once one of a, b leaves
            assert ask(server, smaller[0]) == references[smaller[0]]
            assert sum(r.device_bytes for r in server.backend.residency.residents()) <= sizes["a"] + sizes["b"]
            assert len(server.backend.residency.device) <= 2
    finally:
        server.stop()
    too_big = start(models, tmp_path / "small", max_device_bytes=min(sizes.values()) - 1)
    try:
        code, details = status_of(lambda: ask(too_big, "a"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-device-bytes" in details
    finally:
        too_big.stop()


@pytest.mark.parametrize("field,value,fragment", [
    ("max_device_bytes", 0, "positive integer"), ("max_device_bytes", True, "positive integer"),
    ("max_host_bytes", -1, ">= 0"), ("max_host_bytes", 1.5, ">= 0")])
def test_bad_budgets_are_refused(field, value, fragment):
    with pytest.raises(ConfigError, match=field) as refused:
        ServerConfig(base_model="m", adapter_dir="s", **{field: value})
    assert fragment in str(refused.value)
