"""Issue 19's proof on a local Ray: `adalora serve-ray --replicas 2` in a subprocess, six adapters saved by PEFT in the
store, the real `openai` client at Serve's one HTTP endpoint.

- Greedy answers for all six adapters equal PEFT's own `generate`; a weighted mix equals the in-process Generator.
- Affinity, from the replicas' own counters (the x-adalora-replica and x-adalora-adapter-loads headers): each
  adapter is loaded on one replica, once, and both replicas take a share; a concurrent burst keeps it so.
- One replica's process killed mid-traffic: its requests in flight end with 503 and a message that says so, within
  seconds; every request for the other replica's adapters succeeds; Ray starts a new replica; later requests succeed.
- SIGTERM shuts the application and the local Ray down; the process exits 0.
Slow tier: a local Ray takes about a minute to start here.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("ray.serve", reason="serve-ray needs the ray extra: pip install -e '.[ray]'")

from adalora.config import ConfigError  # noqa: E402
from adalora.engine.sampling import SamplingParams  # noqa: E402
from adalora.server.store import AdapterStore  # noqa: E402
from tests.factories import varied_llama  # noqa: E402
from tests.server_setup import generate_alone, word_tokenizer, write_base  # noqa: E402
from tests.test_http_peft import peft_greedy, peft_model  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = {f"r{i}": 40 + i for i in range(6)}
PROMPT = "w5 w9 w13 w7"
MAX_TOKENS = 8
MIX = {"r0": 0.7, "r3": 0.3}
REPLICA_LINE = re.compile(r"replica ([a-z0-9]+) serving .* \(pid (\d+)\)")
DIED = "the replica serving this request stopped (its process died)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayServed:
    """`adalora serve-ray` in a subprocess (its own local Ray), its log and ready file."""

    def __init__(self, folder: Path, base: Path, store: Path, port: int) -> None:
        self.log, self.ready, self.port = folder / "serve-ray.log", folder / "serve-ray.ready.json", port
        # RAY_DEDUP_LOGS=0: Ray would fold the replicas' alike start lines ("replica X serving ... (pid N)") into one
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0"}
        env.pop("RAY_ADDRESS", None)
        cmd = [sys.executable, "-m", "adalora.cli", "serve-ray", "--base-model", str(base), "--adapter-dir",
               str(store), "--replicas", "2", "--http-port", str(port), "--max-batch-size", "8",
               "--ready-file", str(self.ready)]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(text[-lines:])

    def wait_ready(self, timeout: float = 400) -> None:
        deadline = time.monotonic() + timeout
        while not (self.ready.exists() and json.loads(self.ready.read_text())["pid"] == self.proc.pid):
            if self.proc.poll() is not None:
                pytest.fail(f"serve-ray exited with {self.proc.returncode} before it was ready\n{self.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"serve-ray was not ready within {timeout} s\n{self.tail()}")
            time.sleep(0.2)

    def pids(self) -> dict[str, int]:
        """Replica id -> process id, from each replica's start line in the log."""
        return {r: int(p) for r, p in REPLICA_LINE.findall(self.log.read_text(errors="replace"))}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-serve")
    base, tokenizer = varied_llama(), word_tokenizer()
    base_dir = write_base(base, root / "base", tokenizer)
    peft_texts = {}
    for adapter_id, seed in ADAPTERS.items():
        model = peft_model(base, seed, ("q_proj", "v_proj"))
        model.save_pretrained(root / "adapters" / adapter_id)
        peft_texts[adapter_id] = peft_greedy(model, tokenizer, PROMPT)
    store = AdapterStore(root / "adapters", base_dir)
    adapters = {i: store.read(i).adapter for i in MIX}
    params = SamplingParams(max_new_tokens=MAX_TOKENS, temperature=0.0)
    _, mix_text = generate_alone(base, adapters, tokenizer, tokenizer(PROMPT)["input_ids"], MIX, params)
    server = RayServed(root, base_dir, root / "adapters", free_port())
    server.wait_ready()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0,
                           timeout=120)
    yield server, client, peft_texts, mix_text
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(120)
        except subprocess.TimeoutExpired:
            server.proc.kill()


def complete(client, model: str, **extra):
    """(text, replica id, that replica's load count of the routing adapter)."""
    raw = client.completions.with_raw_response.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                                      temperature=0, extra_body=extra or None)
    return raw.parse().choices[0].text, raw.headers["x-adalora-replica"], int(raw.headers["x-adalora-adapter-loads"])


def test_answers_equal_peft_for_six_adapters_and_the_engine_for_a_mix(world):
    server, client, peft_texts, mix_text = world
    assert len(set(peft_texts.values())) >= 4, "the adapters must change the greedy text for this to test anything"
    for adapter_id, expected in peft_texts.items():
        assert complete(client, adapter_id)[0] == expected, adapter_id
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model="r1", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True))
    assert streamed == peft_texts["r1"]
    text, _, _ = complete(client, "base", adapters=MIX)
    assert text == mix_text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="r9", prompt=PROMPT, max_tokens=2)


def test_each_adapter_is_loaded_on_one_replica_once(world):
    _, client, _, _ = world
    where: dict[str, set[str]] = {i: set() for i in ADAPTERS}
    for _ in range(3):
        for adapter_id in ADAPTERS:
            _, replica, loads = complete(client, adapter_id)
            where[adapter_id].add(replica)
            assert loads == 1, (adapter_id, replica, loads)  # that replica's own counter: never loaded twice
    assert all(len(r) == 1 for r in where.values()), where
    homes = {next(iter(r)) for r in where.values()}
    assert len(homes) == 2, where  # the load is spread: Serve sends a new adapter to the replica with fewest

    def burst(per_adapter: int) -> list[tuple[str, tuple]]:
        with cf.ThreadPoolExecutor(per_adapter * len(ADAPTERS)) as pool:
            return list(pool.map(lambda a: (a, complete(client, a)), [a for a in ADAPTERS for _ in range(per_adapter)]))

    # within capacity (3 adapters x 4 requests per replica, under its 2 x 8 ongoing requests): every request lands
    # on its adapter's replica
    for adapter_id, (_, replica, loads) in burst(4):
        assert replica in where[adapter_id] and loads == 1, (adapter_id, replica, loads, where)


def stream_until_killed(client, adapter_id: str, started: cf.Future | None = None):
    """(adapter, replica, finish reason, the error's message or None) of one streamed completion of 56 tokens."""
    raw = client.completions.with_raw_response.create(model=adapter_id, prompt=PROMPT, max_tokens=56, temperature=0,
                                                      stream=True, extra_body={"ignore_eos": True})
    replica, finish = raw.headers["x-adalora-replica"], None
    try:
        for chunk in raw.parse():
            finish = chunk.choices[0].finish_reason or finish
            if started is not None and not started.done():
                started.set_result(replica)
        return adapter_id, replica, finish, None
    except openai.APIError as e:
        return adapter_id, replica, None, str(e)


def test_a_killed_replica_fails_only_its_streams_in_flight_and_is_restarted(world):
    server, client, peft_texts, _ = world
    home = {a: complete(client, a)[1] for a in ADAPTERS}
    pids = server.pids()
    victim = home["r0"]
    assert victim in pids, (home, pids)
    with cf.ThreadPoolExecutor(2 * len(ADAPTERS)) as pool:  # 6 streams per replica: each has a batch row
        started = {(a, k): cf.Future() for a in ADAPTERS for k in range(2)}
        futures = [pool.submit(stream_until_killed, client, a, started[a, k]) for a, k in started]
        cf.wait([f for (a, _), f in started.items() if home[a] == victim], timeout=120)
        os.kill(pids[victim], signal.SIGKILL)  # every stream on it has its first tokens
        outcomes = [f.result(timeout=180) for f in futures]  # never a hang
    for adapter_id, replica, finish, error in outcomes:
        if replica != victim:
            assert error is None and finish == "length", (adapter_id, replica, error)  # nothing lost there
        else:
            assert error is None or DIED in error, (adapter_id, error)
    assert any(error for _, replica, _, error in outcomes if replica == victim), "the kill hit no stream in flight"

    deadline, replicas = time.monotonic() + 180, set()
    while len(set(pids) | replicas) < 3:  # Ray started a replacement, and it answers
        assert time.monotonic() < deadline, f"no new replica answered within 180 s\n{server.tail()}"
        replicas |= {complete(client, "base")[1] for _ in range(4)}
        time.sleep(0.5)
    for adapter_id, expected in peft_texts.items():
        assert complete(client, adapter_id)[0] == expected, adapter_id


def test_past_capacity_requests_spill_without_reloading(world):
    """18 concurrent requests per replica, over its 2 x 8 ongoing: Serve sends some to the other replica, which loads
    the adapter there once; no replica ever loads an adapter twice."""
    _, client, _, _ = world
    with cf.ThreadPoolExecutor(36) as pool:
        burst = list(pool.map(lambda a: (a, complete(client, a)), [a for a in ADAPTERS for _ in range(6)]))
    assert all(loads == 1 for _, (_, _, loads) in burst), burst


def test_sigterm_shuts_serve_and_ray_down(world):
    server, client, _, _ = world
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(120) == 0, server.tail()
    assert not server.ready.exists()
    with pytest.raises(openai.APIConnectionError):
        client.models.list()


def test_the_serve_run_config_validates_and_builds_the_application(tmp_path):
    """deploy/ray/serve_config.yaml is a valid Serve config whose args build the application through serve-ray's own
    parser (paths pointed at a temporary folder: nothing is loaded)."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from adalora.server.ray_app import build

    document = yaml.safe_load((ROOT / "deploy" / "ray" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(document)
    [app] = schema.applications
    assert app.import_path == "adalora.server.ray_app:build" and app.route_prefix == "/"
    args = {**app.args, "base_model": str(tmp_path), "adapter_dir": str(tmp_path)}
    application = build(args)
    assert type(application).__name__ == "Application"
    with pytest.raises(ConfigError, match="--replicas"):
        build({**args, "replicas": 0})


@pytest.mark.parametrize("path, authorization, loads", [
    ("/v1/completions", b"Bearer k", True),
    ("/v1/chat/completions", b"bearer k", True),
    ("/v1/embeddings", b"Bearer k", True),
    ("/v1/completions", None, False),              # no key: the route answers 401, and nothing was loaded first
    ("/v1/completions", b"Bearer wrong", False),
    ("/v1/load_lora_adapter", b"Bearer k", False),  # admin: loads after its own credential check
    ("/v1/models", b"Bearer k", False),
])
def test_a_replica_loads_a_requests_adapter_first_only_for_a_model_route_with_the_key(tmp_path, path, authorization,
                                                                                        loads):
    from adalora.server.config import ServerConfig
    from adalora.server.forward import HttpCall
    from adalora.server.ray_app import Replica

    replica = Replica.__new__(Replica)  # _may_load reads the config only
    replica.config = ServerConfig(base_model=str(tmp_path), adapter_dir=str(tmp_path), api_key="k")
    headers = () if authorization is None else ((b"authorization", authorization),)
    assert replica._may_load(HttpCall("POST", path, headers=headers)) is loads
