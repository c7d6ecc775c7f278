"""End to end: `adalora serve` as a deployment runs it, a subprocess on port 0 that reports its ports in a
--ready-file, spoken to over gRPC and HTTP only. A tiny random Llama with a word tokenizer and ten adapters in
the store; the reference for every answer is the in-process Generator running that request alone over the same
base and adapters.

Tests run in file order against one shared server (`world.main`), each saying what it changes: health
NOT_SERVING from the moment the port is bound (the log names it) until the model is loaded, then SERVING and the
ready file; 8 adapters, a weighted mix and the base served concurrently; /metrics parsed with prometheus_client's
parser; unload / load / reload while traffic runs (changes e, f, g); every documented status code provoked over
the wire (changes h's folder); then, on a second server (`world.drain`, no tokenizer, no eos, long generations),
a full queue and a SIGTERM drain."""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from transformers import LlamaForCausalLM

from adalora.adapter_file import save_adapter
from adalora.config import ConfigError
from adalora.engine import GenerationRequest, Generator, GeneratorConfig, SamplingParams
from adalora.server.client import AdaLoraClient, generate_request
from adalora.server.commands import serve as serve_command
from adalora.server.config import ServerConfig
from adalora.server.gen.adalora.v1 import adalora_pb2 as pb
from tests.conftest import tiny_llama_config
from tests.server_setup import reference_engine, status_of, until, word_tokenizer, write_base, write_store
from tests.factories import varied_llama
from tests.factories import random_adapter

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "e2e-admin-token"
PRELOAD = ("a", "b", "c", "d", "e", "g", "h", "i")
"""Served from the start; 'f' is only in the store until the load test loads it."""
MIX = {"c": 0.5, "h": 0.7}
MAX_SLOTS, MAX_PROMPT, MAX_NEW, MAX_MESSAGE = 12, 16, 24, 64 * 1024
MAIN_FLAGS = ["--metrics-port", "0", "--max-batch-size", "4", "--max-slots", str(MAX_SLOTS), "--max-prompt-tokens",
              str(MAX_PROMPT), "--max-new-tokens", str(MAX_NEW), "--max-message-bytes", str(MAX_MESSAGE),
              "--grace", "2"]

DRAIN_ROWS, DRAIN_QUEUE, DRAIN_GRACE, DRAIN_TOKENS = 3, 2, 5.0, 100
DRAIN_FLAGS = ["--max-batch-size", str(DRAIN_ROWS), "--max-queue", str(DRAIN_QUEUE), "--max-new-tokens", "200",
               "--max-slots", "4", "--grace", str(DRAIN_GRACE)]

OK = grpc.StatusCode.OK
LISTENING = re.compile(r"listening on \S+:(\d+)")
"""serve()'s log line once the port is bound, before the model loads."""
FINISH = {"length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP, "eos": pb.FINISH_REASON_EOS}


# ---- a server subprocess ---------------------------------------------------------------------------------------

@dataclass
class Served:
    """One `adalora serve` subprocess, its log file and its ready file."""

    name: str
    proc: subprocess.Popen
    log: Path
    ready: Path
    info: dict = field(default_factory=dict)
    """The ready file's JSON once it is SERVING."""

    @classmethod
    def start(cls, name: str, folder: Path, base: Path, store: Path, preload: tuple[str, ...], flags: list[str],
              admin_token: str | None = None) -> Served:
        log, ready = folder / f"{name}.log", folder / f"{name}.ready.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("ADALORA_ADMIN_TOKEN", None)
        if admin_token is not None:
            env["ADALORA_ADMIN_TOKEN"] = admin_token  # the way the README recommends: not in the process list
        cmd = [sys.executable, "-m", "adalora.cli", "serve", "--base-model", str(base), "--adapter-dir",
               str(store), "--port", "0", "--http-port", "0", "--ready-file", str(ready), *flags, "--preload", *preload]
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        return cls(name, proc, log, ready)

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return f"---- last {lines} lines of {self.name}'s log {self.log} ----\n" + "\n".join(text[-lines:])

    def wait_ready(self, timeout: float = 180) -> dict:
        """The ready file's JSON, once this process wrote it; fails with the log tail if it exits or times out."""
        deadline = time.monotonic() + timeout
        while True:
            if self.ready.exists():
                info = json.loads(self.ready.read_text())  # written atomically: never half a file
                if info["pid"] == self.proc.pid:
                    self.info = info
                    return info
            if self.proc.poll() is not None:
                pytest.fail(f"`adalora serve` ({self.name}) exited with {self.proc.returncode} before it was "
                            f"SERVING\n{self.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"`adalora serve` ({self.name}) wrote no ready file {self.ready} within {timeout} s\n"
                            f"{self.tail()}")
            time.sleep(0.05)

    def early_port(self) -> int | None:
        """The gRPC port as the log names it when the port is bound, before the model loads (None until then)."""
        match = LISTENING.search(self.log.read_text(errors="replace")) if self.log.exists() else None
        return None if match is None else int(match.group(1))

    def watch_startup(self, statuses: list[str], timeout: float = 180) -> None:
        """Append each health status of the whole server a Watch reports, from the moment the port is bound until
        SERVING (run it on a thread while the server starts)."""
        deadline = time.monotonic() + timeout
        while (port := self.early_port()) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return
            time.sleep(0.02)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""),
                                                               timeout=timeout)
            try:
                for message in watch:
                    statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(message.status))
                    if message.status == health_pb2.HealthCheckResponse.SERVING:
                        break
            except grpc.RpcError as e:
                statuses.append(e.code().name)
            finally:
                watch.cancel()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.info['port']}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# ---- the in-process reference ----------------------------------------------------------------------------------

class Reference:
    """Each request alone (max_batch_size 1) on an in-process Generator over the same base and adapters; adapters
    are named as in `adapters` (which may hold other versions under other names, e.g. 'g2')."""

    def __init__(self, base, adapters: dict, tokenizer=None) -> None:
        self.engine = reference_engine(base, adapters, max_slots=len(adapters))
        self.tokenizer = tokenizer
        self.cache: dict = {}

    def ids(self, prompt) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"]) if isinstance(prompt, str) else list(prompt)

    def __call__(self, prompt, adapter, max_new: int) -> tuple[list[int], int]:
        """(greedy token ids, finish reason as pb.FinishReason)."""
        key = (tuple(self.ids(prompt)), tuple(sorted(adapter.items())) if isinstance(adapter, dict) else adapter,
               max_new)
        if key not in self.cache:
            generator = Generator(self.engine, GeneratorConfig(max_batch_size=1))
            handle = generator.submit(GenerationRequest(self.ids(prompt), adapter,
                                                        SamplingParams(max_new, temperature=0)))
            while generator.has_work():
                generator.step()
            self.cache[key] = (list(handle.result.token_ids), FINISH[handle.result.finish_reason])
        return self.cache[key]


def ask(client: AdaLoraClient, rpc: str, prompt, adapter, max_new: int, timeout: float = 60) -> tuple[list[int], int]:
    """(token ids, finish reason) of one greedy Generate or GenerateStream call."""
    request = generate_request(prompt, adapter, max_new_tokens=max_new, temperature=0)
    if rpc == "Generate":
        reply = client.stub.Generate(request, timeout=timeout)
        return list(reply.token_ids), reply.finish_reason
    messages = list(client.stub.GenerateStream(request, timeout=timeout))
    return [t for m in messages for t in m.token_ids], messages[-1].finish_reason


# ---- the world: two servers, their files, clients and the reference --------------------------------------------

@dataclass
class World:
    main: Served
    drain: Served
    store: Path
    adapters: dict
    reference: Reference
    drain_reference: Reference
    client: AdaLoraClient | None = None
    admin: AdaLoraClient | None = None
    """Sends the admin token."""
    intruder: AdaLoraClient | None = None
    """Sends a wrong admin token."""
    startup: list[str] = field(default_factory=list)
    """The main server's health statuses from the moment its port was bound until SERVING."""


def drain_llama() -> LlamaForCausalLM:
    """The tiny Llama with room for long generations and no eos token, so every stream runs to its length."""
    torch.manual_seed(1)
    config = tiny_llama_config()
    config.initializer_range, config.max_position_embeddings, config.eos_token_id = 0.3, 512, None
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    base, tokenizer = varied_llama(), word_tokenizer()
    adapters = {adapter_id: random_adapter(base, 20 + i, init_r=2 + i % 3) for i, adapter_id in enumerate("abcdefghi")}
    alien_config = tiny_llama_config()
    alien_config.num_hidden_layers = 3  # another base: other identity
    store = write_store(root / "adapters", {**adapters, "alien": random_adapter(LlamaForCausalLM(alien_config), 5)})
    adapters["g2"] = random_adapter(base, 50, init_r=3)  # what the reload test writes into g's folder
    long_base = drain_llama()
    long_adapters = {"x": random_adapter(long_base, 7), "y": random_adapter(long_base, 8)}
    servers, clients = [], []
    try:
        servers.append(Served.start("main", root, write_base(base, root / "base", tokenizer), store, PRELOAD,
                                    MAIN_FLAGS, TOKEN))
        servers.append(Served.start("drain", root, write_base(long_base, root / "long-base"),
                                    write_store(root / "long-adapters", long_adapters), ("x", "y"), DRAIN_FLAGS))
        startup: list[str] = []
        watcher = threading.Thread(target=servers[0].watch_startup, args=(startup,), daemon=True)
        watcher.start()
        # the references are built while both servers start
        w = World(*servers, store, adapters, Reference(base, adapters, tokenizer), Reference(long_base, long_adapters),
                  startup=startup)
        for served in servers:
            served.wait_ready()
        watcher.join(30)
        w.client, w.admin, w.intruder = clients = [
            AdaLoraClient(w.main.target, timeout=30, admin_token=token) for token in (None, TOKEN, "not-the-token")]
        yield w
    finally:
        for c in clients:
            c.close()
        for served in servers:
            served.stop()


def shows_server_logs(test):
    """On failure, print the tail of each server's log (pytest shows it under 'Captured stdout call')."""
    @functools.wraps(test)
    def wrapper(world, *args, **kwargs):
        try:
            return test(world, *args, **kwargs)
        except BaseException:
            print(world.main.tail())
            print(world.drain.tail())
            raise
    return wrapper



# ---- health and the ready file ---------------------------------------------------------------------------------

@shows_server_logs
def test_health_turns_serving_once_loaded_and_the_ready_file_names_the_ports(world):
    assert world.startup == ["NOT_SERVING", "SERVING"]  # NOT_SERVING while the model loaded (the drain: below)
    info = world.main.info
    assert info["port"] == world.main.early_port()
    assert info["pid"] == world.main.proc.pid and info["host"] == "127.0.0.1"
    assert info["port"] > 0 and info["metrics_port"] > 0 and info["port"] != info["metrics_port"]
    assert info["http_port"] > 0 and info["http_port"] not in (info["port"], info["metrics_port"])  # --http-port 0
    assert world.drain.info["metrics_port"] is None  # started without --metrics-port
    assert world.client.health() == world.client.health("adalora.v1.AdaLora") == "SERVING"
    with urllib.request.urlopen(f"http://127.0.0.1:{info['metrics_port']}/metrics", timeout=10) as reply:
        assert reply.status == 200
    # the Dockerfile's HEALTHCHECK command, pointed at this server's metrics port, passes
    check = dockerfile_healthcheck().replace(":9090/", f":{info['metrics_port']}/")
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, timeout=60).returncode == 0
    # the listing names what --preload loaded
    listing = world.client.list_adapters(include_store=True)
    device = {a.id for a in listing.adapters if a.residency == pb.RESIDENCY_DEVICE}
    assert device == set(PRELOAD) and {"f", "alien"} <= {a.id for a in listing.adapters}
    assert listing.max_slots == MAX_SLOTS


def dockerfile_healthcheck() -> str:
    """The python -c program of the Dockerfile's HEALTHCHECK."""
    text = (Path(__file__).resolve().parents[1] / "Dockerfile").read_text()
    command = json.loads(text[text.index("CMD [", text.index("\nHEALTHCHECK ")) + 4:].split("]", 1)[0]
                         .replace("\\\n", "") + "]")
    assert command[:2] == ["python", "-c"]
    return command[2]


# ---- concurrency -----------------------------------------------------------------------------------------------

CONCURRENT = [  # (rpc, prompt: text or ids, adapter, max_new_tokens): 8 adapters, a mix, the base
    ("Generate", "w5 w9 w13 w7", "a", 10),
    ("GenerateStream", [7, 8, 9], "b", 12),
    ("Generate", [11, 30, 5, 6, 40], "c", 8),
    ("GenerateStream", "w20 w21", "d", 14),
    ("Generate", "w17 w18 w19", "e", 9),
    ("GenerateStream", [12, 13], "g", 11),
    ("Generate", "w50 w6 w6", "h", 13),
    ("GenerateStream", [60, 3, 17], "i", 10),
    ("Generate", [21, 22, 23], MIX, 12),
    ("GenerateStream", "w44 w45", None, 9),
]


@shows_server_logs
def test_many_adapters_a_mix_and_the_base_concurrently_equal_the_reference(world):
    with ThreadPoolExecutor(len(CONCURRENT)) as pool:
        replies = list(pool.map(lambda case: ask(world.client, *case), CONCURRENT))
    for (rpc, prompt, adapter, max_new), reply in zip(CONCURRENT, replies):
        assert reply == world.reference(prompt, adapter, max_new), (rpc, prompt, adapter)
    samples = scrape(world)
    steps = samples[("adalora_batch_size_count", ())]
    assert steps - samples[("adalora_batch_size_bucket", (("le", "1.0"),))] > 0  # some decode steps batched rows


# ---- metrics ---------------------------------------------------------------------------------------------------

def scrape(world) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label pairs): value} of one GET /metrics, parsed by prometheus_client."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in families(world) for s in family.samples}


def families(world) -> list:
    url = f"http://127.0.0.1:{world.main.info['metrics_port']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        return list(text_string_to_metric_families(reply.read().decode()))


def delta(after: dict, before: dict, name: str, keys: tuple[str, ...]) -> Counter:
    """{label values: after - before} of one sample name, changed series only."""
    out = Counter()
    for (sample, labels), value in after.items():
        if sample == name and value != before.get((sample, labels), 0):
            out[tuple(dict(labels)[k] for k in keys)] = value - before.get((sample, labels), 0)
    return out


INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
METRIC_CALLS = [  # (rpc, prompt, adapter, max_new_tokens or a sampling override, status, adapter label)
    ("Generate", [5, 6, 7], "a", 5, OK, "a"),
    ("GenerateStream", "w7 w8", "b", 4, OK, "b"),
    ("Generate", [9], None, 3, OK, ""),
    ("GenerateStream", [10, 11], MIX, 4, OK, "__mix__"),
    ("Generate", [5, 6], "b", 1, OK, "b"),
    ("Generate", [5], "absent", 3, NOT_FOUND, "__unknown__"),
    ("GenerateStream", [5], "Bad/Id", 3, INVALID, "__unknown__"),
    ("Generate", [5], "c", MAX_NEW + 1, INVALID, "c"),
]
ADMIN_CALLS = [  # (rpc, call, status, adapter label)
    ("LoadAdapter", lambda w: w.client.load_adapter("a"), grpc.StatusCode.UNAUTHENTICATED, "a"),
    ("GetAdapter", lambda w: w.client.get_adapter("f"), OK, "f"),
    ("ListAdapters", lambda w: w.client.list_adapters(), OK, ""),
    ("UnloadAdapter", lambda w: w.admin.unload_adapter("absent"), NOT_FOUND, "__unknown__"),
]
HISTOGRAMS = ("adalora_request_seconds", "adalora_queue_seconds", "adalora_time_to_first_token_seconds",
              "adalora_time_per_output_token_seconds", "adalora_batch_size", "adalora_adapter_load_seconds")


def status_and_tokens(world, rpc, prompt, adapter, max_new) -> tuple[grpc.StatusCode, list[int]]:
    try:
        return OK, ask(world.client, rpc, prompt, adapter, max_new)[0]
    except grpc.RpcError as e:
        return e.code(), []


@shows_server_logs
def test_metrics_count_what_was_sent(world):
    before, started = scrape(world), time.time()
    with ThreadPoolExecutor(len(METRIC_CALLS)) as pool:
        results = list(pool.map(lambda row: status_and_tokens(world, *row[:4]), METRIC_CALLS))
    assert [status for status, _ in results] == [row[4] for row in METRIC_CALLS]
    for rpc, call, status, _ in ADMIN_CALLS:
        if status == OK:
            call(world)
        else:
            assert status_of(lambda: call(world))[0] == status, rpc
    sent = Counter((rpc, label, status.name) for rpc, _, _, _, status, label in METRIC_CALLS)
    sent.update((rpc, label, status.name) for rpc, _, status, label in ADMIN_CALLS)
    after = scrape(world)
    assert delta(after, before, "adalora_requests_total", ("rpc", "adapter", "status")) == sent
    latency = Counter()
    for (rpc, label, _), n in sent.items():
        latency[(rpc, label)] += n
    assert delta(after, before, "adalora_request_seconds_count", ("rpc", "adapter")) == latency

    generated, prompt_tokens, finished = Counter(), Counter(), Counter()
    for (_, prompt, _, _, status, label), (_, tokens) in zip(METRIC_CALLS, results):
        if status == OK:
            generated[(label,)] += len(tokens)
            prompt_tokens[(label,)] += len(world.reference.ids(prompt))
            finished[(label,)] += 1
    assert delta(after, before, "adalora_generated_tokens_total", ("adapter",)) == generated
    assert delta(after, before, "adalora_prompt_tokens_total", ("adapter",)) == prompt_tokens
    assert delta(after, before, "adalora_time_to_first_token_seconds_count", ("adapter",)) == finished

    kinds = {f.name: f for f in families(world)}
    for name in HISTOGRAMS:
        assert kinds[name].type == "histogram", name
        assert any(s.name == f"{name}_bucket" and s.labels.get("le") == "+Inf" for s in kinds[name].samples), name
    for name in ("lora_requests_info", "vllm:lora_requests_info"):
        (labels, value), = [(labels, v) for (sample, labels), v in after.items() if sample == name]
        assert dict(labels) == {"running_lora_adapters": "", "waiting_lora_adapters": "",
                                "max_lora": str(MAX_SLOTS)}, name
        assert started <= value <= time.time()
    device = sum(a.residency == pb.RESIDENCY_DEVICE for a in world.client.list_adapters().adapters)
    assert after[("adalora_adapters", (("tier", "device"),))] == device


# ---- adapters change under traffic -----------------------------------------------------------------------------

TRAFFIC = [("Generate", [5, 6, 7], "a", 12), ("GenerateStream", "w8 w30 w31", "b", 12),
           ("Generate", [30, 31], "c", 12), ("GenerateStream", "w40", "d", 12)]


@shows_server_logs
def test_unload_load_and_reload_while_traffic_runs(world):
    """Changes: e unloaded, f loaded, g replaced by g2 (its folder rewritten)."""
    for case in TRAFFIC:
        world.reference(*case[1:])  # computed before, so checking does not slow the traffic
    stop, done, lock = threading.Event(), [], threading.Lock()

    def traffic(worker: int) -> None:
        i = worker
        while not stop.is_set():
            case = TRAFFIC[i % len(TRAFFIC)]
            try:
                outcome = ask(world.client, *case)
            except grpc.RpcError as e:
                outcome = e
            with lock:
                done.append((case, outcome))
            i += 1

    with ThreadPoolExecutor(3) as pool:
        workers = [pool.submit(traffic, w) for w in range(3)]
        try:
            assert until(lambda: len(done) >= 3), "no traffic completed"
            before_changes = len(done)
            assert world.admin.unload_adapter("e").freed_bytes > 0
            loaded = world.admin.load_adapter("f")
            assert not loaded.already_loaded and loaded.adapter.residency == pb.RESIDENCY_DEVICE
            old = world.client.get_adapter("g").version
            save_adapter(world.adapters["g2"], world.store / "g")
            reloaded = world.admin.load_adapter("g", reload=True)
            assert not reloaded.already_loaded and reloaded.adapter.version != old
            after_changes = len(done)
            assert until(lambda: len(done) >= after_changes + 3), "traffic stopped after the adapter changes"
        finally:
            stop.set()
            for w in workers:
                w.result(60)
    assert before_changes >= 3
    for case, outcome in done:
        assert not isinstance(outcome, grpc.RpcError), (case, outcome)
        assert outcome == world.reference(*case[1:]), case
    device = {a.id for a in world.client.list_adapters().adapters if a.residency == pb.RESIDENCY_DEVICE}
    assert "e" not in device and {"f", "g"} <= device
    assert ask(world.client, "Generate", [14, 15], "f", 10) == world.reference([14, 15], "f", 10)
    assert ask(world.client, "GenerateStream", [14, 15], "g", 10) == world.reference([14, 15], "g2", 10)


# ---- every status code -----------------------------------------------------------------------------------------

def _changed_version_without_reload(w: World):
    save_adapter(w.adapters["a"], w.store / "h")  # the store now holds another version of the loaded 'h'
    return w.admin.load_adapter("h")


STATUS_CASES = [  # (status, what provokes it, call, a fragment of the message)
    ("INVALID_ARGUMENT", "prompt over --max-prompt-tokens",
     lambda w: w.client.generate(list(range(5, 6 + MAX_PROMPT)), "a", max_new_tokens=2), "--max-prompt-tokens"),
    ("INVALID_ARGUMENT", "bad sampling value",
     lambda w: w.client.generate([5, 6], "a", max_new_tokens=2, temperature=-1.0), "temperature"),
    ("INVALID_ARGUMENT", "malformed adapter id", lambda w: w.client.generate([5], "Bad/Id"), "must match"),
    ("NOT_FOUND", "Generate for an id not in the store", lambda w: w.client.generate([5], "absent"), "'absent'"),
    ("NOT_FOUND", "GenerateStream for an id not in the store",
     lambda w: list(w.client.generate_stream([5], "absent")), "'absent'"),
    ("NOT_FOUND", "LoadAdapter of an id not in the store", lambda w: w.admin.load_adapter("absent"),
     "not in the store"),
    ("ALREADY_EXISTS", "LoadAdapter of a changed version without reload", _changed_version_without_reload,
     "reload=true"),
    ("FAILED_PRECONDITION", "LoadAdapter of an adapter for another base", lambda w: w.admin.load_adapter("alien"),
     "base"),
    ("FAILED_PRECONDITION", "Classify on a causal LM", lambda w: w.client.classify(["w5"], "a"),
     "Classify needs an encoder"),
    ("RESOURCE_EXHAUSTED", "a message over --max-message-bytes",
     lambda w: w.client.generate("w5 " * (MAX_MESSAGE // 3 + 100), "a"), "larger than max"),
    ("DEADLINE_EXCEEDED", "a 5 ms deadline on a 24-token generation",
     lambda w: w.client.stub.Generate(generate_request([5, 6], "a", max_new_tokens=MAX_NEW, temperature=0),
                                      timeout=0.005), ""),
    ("UNAUTHENTICATED", "LoadAdapter without the admin token", lambda w: w.client.load_adapter("a"),
     "authorization: Bearer"),
    ("PERMISSION_DENIED", "UnloadAdapter with a wrong admin token", lambda w: w.intruder.unload_adapter("a"),
     "admin token"),
]
"""RESOURCE_EXHAUSTED for a full queue and UNAVAILABLE while draining: on the drain server, below."""


@pytest.mark.parametrize("code, what, call, fragment", STATUS_CASES, ids=[f"{c}-{w}" for c, w, _, _ in STATUS_CASES])
@shows_server_logs
def test_every_status_code_over_the_wire(world, code, what, call, fragment):
    got, details = status_of(lambda: call(world))
    assert got.name == code, (what, details)
    assert details and fragment in details, (what, details)


def test_status_cases_cover_every_refusal_the_server_documents():
    provoked = {c for c, *_ in STATUS_CASES} | {"RESOURCE_EXHAUSTED", "UNAVAILABLE"}  # the last two: drain server
    documented = {"INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
                  "UNAVAILABLE", "DEADLINE_EXCEEDED", "UNAUTHENTICATED", "PERMISSION_DENIED"}  # README, gRPC API
    assert documented <= provoked


# ---- the drain server: a full queue, then SIGTERM ----------------------------------------------------------------

@shows_server_logs
def test_a_full_queue_is_resource_exhausted_and_the_accepted_finish(world):
    """10 requests at once for 3 rows and a queue of 2: the ones past the queue are refused at once."""
    n, burst = 64, 10
    with AdaLoraClient(world.drain.target, timeout=60) as client:
        futures = [client.stub.Generate.future(generate_request([5 + i, 6], "xy"[i % 2], max_new_tokens=n,
                                                                temperature=0), timeout=60) for i in range(burst)]
        outcomes = []
        for future in futures:
            try:
                reply = future.result()
                outcomes.append((OK, len(reply.token_ids), reply.finish_reason))
            except grpc.RpcError as e:
                outcomes.append((e.code(), e.details(), None))
    refused = [o for o in outcomes if o[0] != OK]
    assert refused and all(code == grpc.StatusCode.RESOURCE_EXHAUSTED and f"--max-queue {DRAIN_QUEUE}" in details
                           for code, details, _ in refused), refused
    assert burst - len(refused) >= DRAIN_QUEUE
    assert all(o == (OK, n, pb.FINISH_REASON_LENGTH) for o in outcomes if o[0] == OK), outcomes


def _read_all(stream) -> list:
    return list(stream)


@shows_server_logs
def test_sigterm_drains_in_flight_streams_refuses_new_work_and_exits_0(world):
    served = world.drain
    cases = [([5, 6, 7], "x"), ([9, 10], "y"), ([20, 21, 22], None)][:DRAIN_ROWS]
    with AdaLoraClient(served.target, timeout=60) as client, ThreadPoolExecutor(len(cases)) as pool:
        watch = client.health_stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        streams, sent = [], []
        for prompt, adapter in cases:
            sent.append(time.monotonic())
            stream = client.generate_stream(prompt, adapter, max_new_tokens=DRAIN_TOKENS, temperature=0)
            streams.append((next(stream), pool.submit(_read_all, stream)))  # the first token: it runs
        terminated = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)

        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()  # an open Watch would hold the drain for the whole grace
        code, details = status_of(lambda: client.generate([5, 6], "x", max_new_tokens=2))
        assert code == grpc.StatusCode.UNAVAILABLE and details, details
        try:
            assert client.health() != "SERVING"
        except grpc.RpcError as e:  # the port may be closed already
            assert e.code() == grpc.StatusCode.UNAVAILABLE

        for i, ((prompt, adapter), (first, rest), started) in enumerate(zip(cases, streams, sent)):
            messages = [first, *rest.result(DRAIN_GRACE + 30)]
            tokens = [t for m in messages for t in m.token_ids]
            last = messages[-1]
            assert (len(tokens), last.finish_reason, last.usage.completion_tokens) == \
                (DRAIN_TOKENS, pb.FINISH_REASON_LENGTH, DRAIN_TOKENS)
            if i == 0:  # one reference is enough here (the concurrency test checks many); it costs a second
                assert tokens == world.drain_reference(prompt, adapter, DRAIN_TOKENS)[0]
            # the stream was still generating when SIGTERM was sent: it ended after it, so the drain waited for it
            assert last.timings.total_ms / 1e3 > terminated - started
    returncode = served.proc.wait(DRAIN_GRACE + 20)
    exited = time.monotonic() - terminated
    assert returncode == 0 and exited < DRAIN_GRACE + 20, (returncode, exited)
    assert not served.ready.exists()  # removed when the drain began
    assert "draining" in served.log.read_text()


# ---- the ready file and message-size flags ----------------------------------------------------------------------

@pytest.mark.parametrize("ready_file", ["", "  ", 5, Path("x")])
def test_a_bad_ready_file_is_refused(ready_file):
    with pytest.raises(ConfigError, match="ready_file must be a file path"):
        ServerConfig(base_model="m", adapter_dir="a", ready_file=ready_file)


def test_ready_file_and_max_message_bytes_flags():
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    required = ["--base-model", "m", "--adapter-dir", "a"]
    config = serve_command.config_from(parser.parse_args(required))
    assert (config.ready_file, config.max_message_bytes) == (None, ServerConfig("m", "a").max_message_bytes)
    config = serve_command.config_from(parser.parse_args([*required, "--ready-file", "r.json",
                                                          "--max-message-bytes", "1000"]))
    assert (config.ready_file, config.max_message_bytes) == ("r.json", 1000)
    with pytest.raises(ConfigError, match="max_message_bytes"):
        serve_command.config_from(parser.parse_args([*required, "--max-message-bytes", "0"]))


# ---- a bad --preload -------------------------------------------------------------------------------------------

BAD_PRELOADS = [("absent", "is not in the store"), ("Bad/Id", "must match"), ("alien", "its own base model")]


@pytest.mark.parametrize("preload, fragment", BAD_PRELOADS)
def test_a_bad_preload_exits_2_with_the_reason(tmp_path, capsys, preload, fragment):
    """The CLI's own contract: the message, no traceback, exit 2 (it was an uncaught engine error, exit 1)."""
    from adalora.cli import main
    alien_config = tiny_llama_config()
    alien_config.num_hidden_layers = 3
    store = write_store(tmp_path / "adapters", {"alien": random_adapter(LlamaForCausalLM(alien_config), 5)})
    base = write_base(varied_llama(), tmp_path / "base")
    code = main(["serve", "--base-model", str(base), "--adapter-dir", str(store), "--port", "0", "--http-port", "off",
                 "--ready-file", str(tmp_path / "ready.json"), "--preload", preload])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("adalora serve: error: ") and fragment in err, err
    assert not (tmp_path / "ready.json").exists()
