"""Prometheus metrics of the gRPC server, scraped over HTTP from an in-process server (tiny random Llama, metrics on
port 0): after a table of Generate / GenerateStream calls every count equals what the replies and the table say;
the live gauges (queue, running, lora_requests_info) while a request is held mid-generation; 1000 requests for
unknown ids add no series; LoadAdapter / UnloadAdapter move hits, misses, evictions, tiers and bytes; and the
metrics_port config / --metrics-port flag."""

import argparse
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from adalora.adapter_file import save_adapter
from adalora.config import ConfigError
from adalora.server.client import generate_request
from adalora.server.commands import serve as serve_command
from adalora.server.config import ServerConfig
from adalora.server.gen.adalora.v1 import adalora_pb2 as pb
from adalora.server.metrics import MetricsEndpoint
from tests.server_setup import ServerThread, word_tokenizer, write_base, write_store
from tests.factories import varied_llama
from tests.factories import random_adapter

OK, NOT_FOUND, INVALID = grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT
MAX_SLOTS, MAX_BATCH = 4, 4  # MAX_BATCH: a bucket bound of adalora_batch_size


@pytest.fixture
def setup(tmp_path):
    """'a' and 'b' preloaded, 'c' only in the store."""
    base = varied_llama()
    adapters = {"a": random_adapter(base, 1), "b": random_adapter(base, 2, init_r=6), "c": random_adapter(base, 3)}
    config = ServerConfig(base_model=str(write_base(base, tmp_path / "base", word_tokenizer())),
                          adapter_dir=str(write_store(tmp_path / "adapters", adapters)), preload=("a", "b"), port=0,
                          metrics_port=0, max_slots=MAX_SLOTS, max_batch_size=MAX_BATCH, max_new_tokens=16,
                          default_max_new_tokens=4)
    server = ServerThread(config)
    yield server, adapters
    server.stop()


# ---- scraping -------------------------------------------------------------------------------------------------

def scrape(server: ServerThread) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label pairs): value} of one GET /metrics."""
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def series(samples: dict, name: str) -> dict[tuple, float]:
    """{label pairs: value} of one sample name."""
    return {labels: value for (sample, labels), value in samples.items() if sample == name}


def by(samples: dict, name: str, key: str) -> dict[str, float]:
    """{value of label `key`: sample value} of a sample name with that one label."""
    return {dict(labels)[key]: value for labels, value in series(samples, name).items()}


def factor_bytes(adapter) -> int:
    """float32 bytes of the adapter's folded factors: rank x (in + out) per adapted module (rank 0 holds none)."""
    ranks = adapter.ranks()
    return 4 * sum(ranks[path] * (in_f + out_f) for path, (in_f, out_f) in adapter.shapes.items())


# ---- calls ----------------------------------------------------------------------------------------------------

CALLS = [  # (rpc, prompt ids, adapter, max_new_tokens, status, the adapter label it must be counted under)
    ("Generate", [5, 6, 7], "a", 6, OK, "a"),
    ("Generate", [9, 10], "a", 4, OK, "a"),
    ("Generate", [40, 41, 42, 43], "b", 7, OK, "b"),
    ("GenerateStream", [11, 12, 13], "b", 5, OK, "b"),
    ("Generate", [20, 21], None, 3, OK, ""),
    ("GenerateStream", [30], {"a": 0.5, "b": 0.7}, 5, OK, "__mix__"),
    ("Generate", [8], "a", 1, OK, "a"),  # one token: no time-per-output-token sample
    ("Generate", [5, 6], "nope", 4, NOT_FOUND, "__unknown__"),
    ("GenerateStream", [5, 6], "c", 4, OK, "c"),  # in the store, not loaded: loaded on demand
    ("Generate", [5, 64], "a", 4, INVALID, "a"),  # token id out of the vocabulary
    ("Generate", [5, 6], {"a": 1.0, "zzz": 1.0}, 4, NOT_FOUND, "__mix__"),
]


def run(server: ServerThread, rpc: str, prompt, adapter, max_new: int) -> tuple[grpc.StatusCode, list[int]]:
    """(status, generated token ids) of one call."""
    request = generate_request(prompt, adapter, max_new_tokens=max_new, temperature=0)
    try:
        if rpc == "Generate":
            return OK, list(server.client.stub.Generate(request, timeout=60).token_ids)
        return OK, [t for m in server.client.stub.GenerateStream(request, timeout=60) for t in m.token_ids]
    except grpc.RpcError as e:
        return e.code(), []


def test_counts_equal_the_replies(setup):
    server, adapters = setup
    started = time.time()
    with ThreadPoolExecutor(len(CALLS)) as pool:  # concurrent: decode steps of several rows
        results = list(pool.map(lambda row: run(server, *row[:4]), CALLS))
    assert [status for status, _ in results] == [row[4] for row in CALLS]
    ok = [(row, tokens) for row, (status, tokens) in zip(CALLS, results) if status == OK]
    assert all(tokens for _, tokens in ok)
    with server.backend.lock:  # the generation thread records a step's batch size after its tokens went out
        samples = scrape(server)

    expected_requests = Counter((rpc, label, status.name) for rpc, _, _, _, status, label in CALLS)
    assert series(samples, "adalora_requests_total") == {
        (("adapter", label), ("rpc", rpc), ("status", status)): count
        for (rpc, label, status), count in expected_requests.items()}
    latency = Counter((rpc, label) for rpc, *_, label in CALLS)
    assert series(samples, "adalora_request_seconds_count") == {
        (("adapter", label), ("rpc", rpc)): count for (rpc, label), count in latency.items()}

    generated, prompt, finished, multi = Counter(), Counter(), Counter(), Counter()
    for (_, ids, _, _, _, label), tokens in ok:
        generated[label] += len(tokens)
        prompt[label] += len(ids)
        finished[label] += 1
        multi[label] += len(tokens) > 1
    assert by(samples, "adalora_generated_tokens_total", "adapter") == generated
    assert by(samples, "adalora_prompt_tokens_total", "adapter") == prompt
    assert by(samples, "adalora_queue_seconds_count", "adapter") == finished
    assert by(samples, "adalora_time_to_first_token_seconds_count", "adapter") == finished
    assert by(samples, "adalora_time_per_output_token_seconds_count", "adapter") == +multi

    # each decode step gives each of its rows one token; the first token of a request comes from its prefill
    steps = samples[("adalora_batch_size_count", ())]
    assert samples[("adalora_batch_size_sum", ())] == sum(len(tokens) - 1 for _, tokens in ok)
    assert samples[("adalora_batch_size_bucket", (("le", f"{float(MAX_BATCH)}"),))] == steps > 0

    assert by(samples, "adalora_adapters", "tier") == {"device": 3, "host": 0, "disk": 0}
    engine, residents = server.backend.engine, server.backend.residency.residents()
    assert samples[("adalora_adapter_device_bytes", ())] == sum(engine.nbytes(r.key) for r in residents) == \
        sum(factor_bytes(adapters[i]) for i in "abc") > 0
    # 'c' loaded once (a miss); every other adapter a request named was on the device (a hit each: 'a' x4 with
    # the out-of-vocabulary one, which is refused after its adapters are held; 'b' x2; the mix a+b x2)
    assert (samples[("adalora_adapter_cache_hits_total", ())], samples[("adalora_adapter_cache_misses_total", ())],
            samples[("adalora_adapter_load_seconds_count", ())]) == (8, 1, 1)

    for name in ("lora_requests_info", "vllm:lora_requests_info"):
        (labels, value), = series(samples, name).items()
        assert dict(labels) == {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": str(MAX_SLOTS)}
        assert started <= value <= time.time()
    for name in ("adalora_queue_depth", "adalora_running_requests", "vllm:num_requests_waiting",
                 "vllm:num_requests_running", "adalora_batch_rows_used_ratio", "vllm:gpu_cache_usage_perc"):
        assert samples[(name, ())] == 0, name


def test_live_gauges_while_a_request_runs_and_another_waits(setup):
    server, _ = setup
    held = ([5, 6, 7], "a", 10)
    assert server.client.generate(*held[:2], max_new_tokens=held[2], temperature=0).finish_reason == \
        pb.FINISH_REASON_LENGTH  # precondition: it runs past its first decode step
    hooks, inflight = server.backend.generator.hooks, server.server.metrics.inflight
    observe, entered, gate = hooks.on_decode, threading.Event(), threading.Event()

    def hold(rows: int) -> None:  # on the generation thread, inside the step, with the model lock held
        observe(rows)
        if inflight.snapshot()[1]:  # a step of the held request, not the tail of the precondition's last step
            entered.set()
            gate.wait(30)

    hooks.on_decode = hold
    with ThreadPoolExecutor(2) as pool:
        try:
            running = pool.submit(run, server, "GenerateStream", held[0], "a", held[2])
            assert entered.wait(30)
            hooks.on_decode = observe
            waiting = pool.submit(run, server, "Generate", [9, 9], "b", 4)
            deadline = time.monotonic() + 30
            while len(inflight.snapshot()[0]) < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            samples = scrape(server)
        finally:
            gate.set()
        assert running.result()[0] == waiting.result()[0] == OK
    (labels, _), = series(samples, "lora_requests_info").items()
    assert dict(labels) == {"running_lora_adapters": "a", "waiting_lora_adapters": "b", "max_lora": str(MAX_SLOTS)}
    assert series(samples, "vllm:lora_requests_info").keys() == series(samples, "lora_requests_info").keys()
    assert (samples[("adalora_queue_depth", ())], samples[("adalora_running_requests", ())]) == (1, 1)
    assert samples[("adalora_batch_rows_used_ratio", ())] == samples[("vllm:gpu_cache_usage_perc", ())] == \
        1 / MAX_BATCH
    assert (samples[("vllm:num_requests_waiting", ())], samples[("vllm:num_requests_running", ())]) == (1, 1)
    after = scrape(server)
    assert dict(next(iter(series(after, "lora_requests_info")))) == {
        "running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": str(MAX_SLOTS)}


UNKNOWN_CALLS = [  # the 1000 requests take turns, each naming another unknown id
    lambda s, i: s.client.stub.Generate(generate_request([5], f"nope-{i}"), timeout=30),
    lambda s, i: s.client.stub.LoadAdapter(pb.LoadAdapterRequest(id=f"missing-{i}"), timeout=30),
    lambda s, i: s.client.stub.GetAdapter(pb.GetAdapterRequest(id=f"Bad/Id-{i}"), timeout=30),
    lambda s, i: s.client.stub.UnloadAdapter(pb.UnloadAdapterRequest(id=f"gone-{i}"), timeout=30),
]


def test_unknown_ids_add_no_series(setup):
    server, _ = setup
    for call in UNKNOWN_CALLS:  # the first of each kind creates its __unknown__ series
        with pytest.raises(grpc.RpcError):
            call(server, -1)
    before = scrape(server)
    for i in range(1000):
        with pytest.raises(grpc.RpcError):
            UNKNOWN_CALLS[i % len(UNKNOWN_CALLS)](server, i)
    after = scrape(server)
    assert after.keys() == before.keys()
    grown = {key: after[key] - before[key] for key in after
             if key[0] == "adalora_requests_total" and after[key] != before[key]}
    assert grown == {
        ("adalora_requests_total", (("adapter", "__unknown__"), ("rpc", rpc), ("status", status))): 250
        for rpc, status in [("Generate", "NOT_FOUND"), ("LoadAdapter", "NOT_FOUND"),
                            ("GetAdapter", "INVALID_ARGUMENT"), ("UnloadAdapter", "NOT_FOUND")]}
    assert not [key for key in after if any(v.startswith(("nope", "missing", "Bad", "gone")) for _, v in key[1])]


ADMIN = [  # (rpc, id, weights written to its store folder first, then (hits, misses, evictions, loads), loaded)
    ("load", "c", None, (0, 1, 0, 1), {"a", "b", "c"}),
    ("load", "c", None, (1, 1, 0, 1), {"a", "b", "c"}),  # the same version: a hit
    ("load", "a", None, (2, 1, 0, 1), {"a", "b", "c"}),  # preloaded: a hit
    ("load", "c", "b", (2, 2, 1, 2), {"a", "b", "c"}),  # a new version replaces the old: a miss and an eviction
    ("unload", "a", None, (2, 2, 2, 2), {"b", "c"}),
    ("unload", "c", None, (2, 2, 3, 2), {"b"}),
]


def test_load_and_unload_move_cache_counts_tiers_and_bytes(setup):
    server, adapters = setup
    versions = dict(adapters)  # what each store folder holds
    for rpc, adapter_id, write, (hits, misses, evictions, loads), loaded in ADMIN:
        if write is not None:
            save_adapter(adapters[write], f"{server.config.adapter_dir}/{adapter_id}")
            versions[adapter_id] = adapters[write]
        if rpc == "load":
            server.client.load_adapter(adapter_id, reload=True)
        else:
            server.client.unload_adapter(adapter_id)
        samples = scrape(server)
        got = tuple(samples[(name, ())] for name in ("adalora_adapter_cache_hits_total",
                                                     "adalora_adapter_cache_misses_total",
                                                     "adalora_adapter_evictions_total",
                                                     "adalora_adapter_load_seconds_count"))
        assert got == (hits, misses, evictions, loads)
        assert by(samples, "adalora_adapters", "tier") == {"device": len(loaded), "host": 0, "disk": 3 - len(loaded)}
        assert samples[("adalora_adapter_device_bytes", ())] == sum(factor_bytes(versions[i]) for i in loaded)
    with pytest.raises(grpc.RpcError):  # a refused unload evicts nothing
        server.client.unload_adapter("a")
    assert scrape(server)[("adalora_adapter_evictions_total", ())] == 3


# ---- config and flag ------------------------------------------------------------------------------------------

BAD_PORTS = [(-1, "[0, 65535]"), (65536, "[0, 65535]"), (True, "[0, 65535]"), ("9100", "[0, 65535]"),
             (9.5, "[0, 65535]"), (50051, "port of its own")]


@pytest.mark.parametrize("metrics_port,fragment", BAD_PORTS)
def test_bad_metrics_port_is_refused(metrics_port, fragment):
    with pytest.raises(ConfigError, match="metrics_port") as refused:
        ServerConfig(base_model="m", adapter_dir="s", port=50051, metrics_port=metrics_port)
    assert fragment in str(refused.value)


def test_metrics_port_flag_and_defaults(tmp_path):
    assert ServerConfig(base_model="m", adapter_dir="s", port=0, metrics_port=0).metrics_port == 0
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    required = ["--base-model", "m", "--adapter-dir", "s"]
    assert serve_command.config_from(parser.parse_args(required)).metrics_port is None
    assert serve_command.config_from(parser.parse_args([*required, "--metrics-port", "9100"])).metrics_port == 9100
    config = ServerConfig(base_model=str(tmp_path), adapter_dir=str(tmp_path), port=0)
    server = ServerThread(config, attach=False)
    try:
        assert server.server.metrics_port is None and server.server.endpoint is None
    finally:
        server.stop()


def test_metrics_are_served_before_the_model_loads_and_stop_with_the_server(tmp_path):
    server = ServerThread(ServerConfig(base_model=str(tmp_path), adapter_dir=str(tmp_path), port=0, metrics_port=0),
                          attach=False)
    try:
        assert server.client.health() == "NOT_SERVING"
        samples = scrape(server)
        assert by(samples, "adalora_adapters", "tier") == {"device": 0, "host": 0, "disk": 0}
    finally:
        server.stop()
    with pytest.raises(urllib.error.URLError):
        scrape(server)


def test_a_busy_metrics_port_says_which_flag_to_change():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(OSError, match="--metrics-port"):
            MetricsEndpoint(CollectorRegistry(), "127.0.0.1", busy.getsockname()[1], lambda: True)


# ---- /healthz --------------------------------------------------------------------------------------------------

def healthz(server: ServerThread) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/healthz", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def one_adapter_config(tmp_path) -> ServerConfig:
    """A server over the varied tiny llama with adapter "a", gRPC and /metrics on any free port."""
    base = varied_llama()
    return ServerConfig(base_model=str(write_base(base, tmp_path / "base", word_tokenizer())),
                        adapter_dir=str(write_store(tmp_path / "adapters", {"a": random_adapter(base, 1)})), port=0,
                        metrics_port=0)


def test_healthz_follows_grpc_health_while_loading_serving_and_draining(tmp_path):
    """/healthz on the metrics port answers what grpc.health.v1 answers for the whole server: 503 while the base
    model loads, 200 once it serves, 503 from the start of a drain (HTTP probes need no gRPC or TLS)."""
    config = one_adapter_config(tmp_path)
    server = ServerThread(config, attach=False)
    try:
        assert healthz(server) == (503, "NOT_SERVING\n") and server.client.health() == "NOT_SERVING"
        server.attach()
        assert healthz(server) == (200, "SERVING\n") and server.client.health() == "SERVING"
        server.call(server.server.health.enter_graceful_shutdown())  # what stop() does first
        assert healthz(server) == (503, "NOT_SERVING\n") and server.client.health() == "NOT_SERVING"
        assert "adalora_queue_depth" in {s[0] for s in scrape(server)}  # /metrics still answers beside it
    finally:
        server.stop()


def test_the_drain_delay_reports_not_serving_while_requests_are_still_taken(tmp_path):
    """Server.announce_drain (SIGTERM with --drain-delay): /healthz 503 and grpc.health.v1 NOT_SERVING, so probes
    and endpoint pickers stop sending, while a request that still arrives is answered; the drain then refuses."""
    config = one_adapter_config(tmp_path)
    server = ServerThread(config)
    try:
        assert healthz(server) == (200, "SERVING\n")
        server.call(server.server.announce_drain())
        assert healthz(server) == (503, "NOT_SERVING\n") and server.client.health() == "NOT_SERVING"
        assert not server.server.gate.serving
        assert len(server.client.generate([5, 6], "a", max_new_tokens=3, temperature=0).token_ids) == 3
        server.call(server.server.health.enter_graceful_shutdown())
        server.server.gate.draining = True  # what stop() does next
        with pytest.raises(grpc.RpcError) as refused:
            server.client.generate([5, 6], "a", max_new_tokens=3)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()
