"""Serving over gRPC and HTTP: bounded open-loop load against `adalora serve` (a subprocess, loopback) vs the same
load on the in-process Backend, with 4, 32 and 256 adapters loaded; the fewest-adapters server also takes the same
load over its OpenAI HTTP API (/v1/completions, streamed as server-sent events), one front-end after the other.

Requests arrive as a Poisson process at --rate per second for --duration seconds (the same seeded arrival
times, prompts and adapter draws for every configuration); each names one adapter drawn with Zipf(1)
popularity over the loaded set, sends PROMPT_LEN random token ids and asks for --new-tokens greedy tokens
(GenerateStream, so the client sees the first token). At most --max-inflight requests are outstanding: an
arrival past that bound is counted as dropped (open loop, bounded). Adapters are generated with realistic
AdaLoRA rank patterns (see engine_throughput.py) and all preloaded (--max-slots = the adapter count: the
"fits on the device" case). One more configuration, on-demand/<N>/<S>: the most adapters (N) in the store but
only --on-demand S device slots and none preloaded, so requests load adapters on demand and the least recently
used ones are evicted to host memory (the residency tiers at work, including the first load of each).

Reported per configuration: completed req/s, generated tokens/s, p50/p99 time to first token (TTFT) and
time per output token after the first (TPOT), errors and drops. Targets: gRPC and HTTP within 10% of in-process at
the same load; 256 adapters within 10% of 4.

    python benchmarks/serve_grpc.py --quick              # tiny random llama, seconds
    python benchmarks/serve_grpc.py [--rate 0.6] [--duration 90] [--device cpu|cuda] [--on-demand 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc  # noqa: E402
import httpx2  # noqa: E402 - the HTTP client the openai package uses (a dev dependency)
import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from _common import RESULTS, markdown_table, write_json  # noqa: E402
from adalora.adapter_file import save_adapter  # noqa: E402
from adalora.engine import SamplingParams  # noqa: E402
from adalora.inject import resolve_targets  # noqa: E402
from adalora.layers import linear_dims  # noqa: E402
from engine_throughput import TARGETS, load_base, make_adapter  # noqa: E402
from adalora.server.backend import Backend  # noqa: E402
from adalora.server.domain import Completion, GenerateCall, TokenDelta  # noqa: E402
from adalora.server.client import generate_request  # noqa: E402
from adalora.server.config import ServerConfig  # noqa: E402
from adalora.server.gen.adalora.v1 import adalora_pb2_grpc as pb_grpc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT_LEN = 32
ADAPTER_COUNTS = (4, 32, 256)


@dataclass(frozen=True)
class Arrival:
    at: float
    """Seconds after the start."""
    prompt: tuple[int, ...]
    adapter: int
    """Rank in popularity; the id is a{adapter}."""


@dataclass
class Outcome:
    sent: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    error: str | None = None


def arrivals(rate: float, duration: float, loaded: int, vocab: int, seed: int) -> list[Arrival]:
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) for k in range(loaded)]
    out, t = [], rng.expovariate(rate)
    while t < duration:
        prompt = tuple(rng.randrange(3, vocab) for _ in range(PROMPT_LEN))
        out.append(Arrival(t, prompt, rng.choices(range(loaded), weights=weights)[0]))
        t += rng.expovariate(rate)
    return out


async def run_load(plan: list[Arrival], send, max_inflight: int) -> tuple[list[Outcome], int, float]:
    """Fire each arrival at its time through `send(arrival, outcome)`; (outcomes, dropped, wall seconds)."""
    start = time.perf_counter()
    inflight: set[asyncio.Task] = set()
    outcomes, dropped = [], 0
    for arrival in plan:
        await asyncio.sleep(max(0.0, start + arrival.at - time.perf_counter()))
        if len(inflight) >= max_inflight:
            dropped += 1
            continue
        outcome = Outcome(sent=time.perf_counter())
        outcomes.append(outcome)
        task = asyncio.ensure_future(send(arrival, outcome))
        inflight.add(task)
        task.add_done_callback(inflight.discard)
    if inflight:
        await asyncio.wait(inflight)
    return outcomes, dropped, time.perf_counter() - start


def grpc_sender(stub, new_tokens: int):
    async def send(arrival: Arrival, outcome: Outcome) -> None:
        request = generate_request(list(arrival.prompt), f"a{arrival.adapter}", max_new_tokens=new_tokens,
                                   temperature=0)
        try:
            async for message in stub.GenerateStream(request):
                if message.token_ids:
                    now = time.perf_counter()
                    outcome.first = outcome.first or now
                    outcome.last = now
                    outcome.tokens += len(message.token_ids)
        except grpc.aio.AioRpcError as e:
            outcome.error = e.code().name
    return send


def http_sender(client: httpx2.AsyncClient, new_tokens: int):
    """POST /v1/completions with stream=true; each SSE chunk with text counts one token (the server sends one per
    token, no stop sequences here)."""
    async def send(arrival: Arrival, outcome: Outcome) -> None:
        body = {"model": f"a{arrival.adapter}", "prompt": list(arrival.prompt), "max_tokens": new_tokens,
                "temperature": 0, "stream": True}
        try:
            async with client.stream("POST", "/v1/completions", json=body) as reply:
                if reply.status_code != 200:
                    outcome.error = f"{reply.status_code} {(await reply.aread()).decode()[:200]}"
                    return
                async for line in reply.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    choice = json.loads(line[6:])["choices"][0]
                    if choice["finish_reason"] is None:
                        now = time.perf_counter()
                        outcome.first = outcome.first or now
                        outcome.last = now
                        outcome.tokens += 1
        except httpx2.HTTPError as e:
            outcome.error = type(e).__name__
    return send


def backend_sender(backend: Backend, new_tokens: int):
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)

    async def send(arrival: Arrival, outcome: Outcome) -> None:
        call = GenerateCall(prompt=arrival.prompt, adapter=f"a{arrival.adapter}", params=params)
        try:
            async for event in backend.generate(call):
                if isinstance(event, TokenDelta):
                    now = time.perf_counter()
                    outcome.first = outcome.first or now
                    outcome.last = now
                    outcome.tokens += 1
                elif isinstance(event, Completion):
                    break
        except Exception as e:  # noqa: BLE001 - counted as an error of this request
            outcome.error = type(e).__name__
    return send


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarize(outcomes: list[Outcome], dropped: int, wall: float) -> dict:
    done = [o for o in outcomes if o.error is None and o.first is not None]
    ttft = [o.first - o.sent for o in done]
    tpot = [(o.last - o.first) / (o.tokens - 1) for o in done if o.tokens > 1]
    return {"requests": len(outcomes), "completed": len(done), "errors": len(outcomes) - len(done),
            "dropped": dropped, "wall_s": wall, "req_s": len(done) / wall,
            "tok_s": sum(o.tokens for o in done) / wall,
            "ttft_p50_ms": 1e3 * percentile(ttft, 0.5), "ttft_p99_ms": 1e3 * percentile(ttft, 0.99),
            "tpot_p50_ms": 1e3 * percentile(tpot, 0.5), "tpot_p99_ms": 1e3 * percentile(tpot, 0.99)}


# ---------------------------------------------------------------- setup


def write_base(quick: bool, folder: Path) -> Path:
    """The prepared SmolLM2-135M folder, or (quick) engine_throughput's tiny random llama saved to `folder`."""
    if not quick:
        from adalora.assets import model_path
        return model_path("smollm2-135m")
    model = load_base(True, torch.device("cpu"), torch.float32)
    model.save_pretrained(folder)
    word_tokenizer(model.config.vocab_size).save_pretrained(folder)  # the HTTP API streams text
    return folder


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Words t0..t{vocab_size - 1}, one per token id, so every generated token decodes to text."""
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t1", pad_token="t0")


def write_store(base: Path, folder: Path, count: int) -> None:
    model = LlamaForCausalLM.from_pretrained(base)
    shapes = {p: linear_dims(model.get_submodule(p)) for p in resolve_targets(model, TARGETS)}
    for i in range(count):
        save_adapter(make_adapter(model, shapes, seed=i), folder / f"a{i}")


def server_config(args, base: Path, store: Path, loaded: int, port: int = 0, slots: int | None = None) -> ServerConfig:
    """`loaded` adapters preloaded in as many slots; or, with `slots`, none preloaded and `slots` slots."""
    preload = () if slots else tuple(f"a{i}" for i in range(loaded))
    return ServerConfig(base_model=str(base), adapter_dir=str(store), preload=preload,
                        port=port, device=args.device, dtype=args.dtype, max_batch_size=args.max_batch_size,
                        max_slots=slots or max(loaded, 1), max_new_tokens=max(args.new_tokens, 64))


def start_server(config: ServerConfig, log: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, dict]:
    """`adalora serve` in a subprocess on ports 0 (with `env` added to its environment); returns once it is
    SERVING, with its ready file ("port", "http_port": the ports it bound, so no other process can take one
    between choosing and binding it)."""
    ready = log.with_suffix(".ready.json")
    cmd = [sys.executable, "-m", "adalora.cli", "serve", "--base-model", config.base_model,
           "--adapter-dir", config.adapter_dir, "--port", "0", "--http-port", "0", "--ready-file", str(ready),
           "--device", config.device, "--decoder", config.decoder, "--weights", config.weights,
           "--dtype", config.dtype, "--max-batch-size", str(config.max_batch_size), "--max-slots",
           str(config.max_slots), "--max-new-tokens", str(config.max_new_tokens), "--preload", *config.preload,
           "--gather-ms", str(config.gather_ms), *([] if config.cuda_graphs else ["--no-cuda-graphs"])]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=None if env is None else {**os.environ, **env})
    deadline = time.time() + 600
    while time.time() < deadline:
        if ready.exists():
            return proc, json.loads(ready.read_text())
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); its log: {log}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not report SERVING within 600 s; its log: {log}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


async def over_grpc(port: int, plan: list[Arrival], args) -> dict:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.AdaLoraStub(channel)
        await run_load(plan[:2], grpc_sender(stub, args.new_tokens), args.max_inflight)  # warm-up
        return summarize(*await run_load(plan, grpc_sender(stub, args.new_tokens), args.max_inflight))


async def over_http(port: int, plan: list[Arrival], args) -> dict:
    limits = httpx2.Limits(max_connections=args.max_inflight, max_keepalive_connections=args.max_inflight)
    async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600, limits=limits) as client:
        await run_load(plan[:2], http_sender(client, args.new_tokens), args.max_inflight)  # warm-up
        return summarize(*await run_load(plan, http_sender(client, args.new_tokens), args.max_inflight))


async def in_process(config: ServerConfig, plan: list[Arrival], args) -> dict:
    backend = await asyncio.to_thread(Backend.open, config)
    try:
        await run_load(plan[:2], backend_sender(backend, args.new_tokens), args.max_inflight)  # warm-up
        return summarize(*await run_load(plan, backend_sender(backend, args.new_tokens), args.max_inflight))
    finally:
        backend.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny random llama, a few seconds of load")
    ap.add_argument("--rate", type=float, default=None, help="arrivals per second (default 0.6; quick 4)")
    ap.add_argument("--duration", type=float, default=None, help="seconds of arrivals (default 90; quick 3)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens per request (default 64; quick 8)")
    ap.add_argument("--max-inflight", type=int, default=64, help="bound on outstanding requests (open loop)")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--adapters", type=int, nargs="+", default=list(ADAPTER_COUNTS), help="adapters loaded")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--on-demand", type=int, default=None, metavar="SLOTS",
                    help="device slots of the on-demand configuration (default 16; quick 2; 0 = skip it)")
    args = ap.parse_args()
    args.on_demand = (2 if args.quick else 16) if args.on_demand is None else args.on_demand
    args.rate = args.rate or (4.0 if args.quick else 0.6)
    args.duration = args.duration or (3.0 if args.quick else 90.0)
    args.new_tokens = args.new_tokens or (8 if args.quick else 64)
    if args.rate <= 0 or args.duration <= 0 or args.new_tokens < 2 or min(args.adapters) < 1:
        raise SystemExit("--rate and --duration must be > 0, --new-tokens >= 2 and --adapters >= 1")
    rows, results = [], {"quick": args.quick, "args": vars(args), "configs": {}}
    with tempfile.TemporaryDirectory(prefix="adalora-serve-bench-") as tmp_name:
        tmp = Path(tmp_name)
        base = write_base(args.quick, tmp / "base")
        store = tmp / "store"
        write_store(base, store, max(args.adapters))
        vocab = LlamaForCausalLM.from_pretrained(base).config.vocab_size
        first = min(args.adapters)
        plan = arrivals(args.rate, args.duration, first, vocab, args.seed)
        results["configs"][f"in-process/{first}"] = asyncio.run(in_process(server_config(args, base, store, first), plan, args))
        for loaded in args.adapters:
            plan = arrivals(args.rate, args.duration, loaded, vocab, args.seed)
            proc, ports = start_server(server_config(args, base, store, loaded), tmp / f"server-{loaded}.log")
            try:
                results["configs"][f"grpc/{loaded}"] = asyncio.run(over_grpc(ports["port"], plan, args))
                if loaded == first:
                    results["configs"][f"http/{loaded}"] = asyncio.run(over_http(ports["http_port"], plan, args))
            finally:
                stop_server(proc)
        most = max(args.adapters)
        if 0 < args.on_demand < most:
            plan = arrivals(args.rate, args.duration, most, vocab, args.seed)
            config = server_config(args, base, store, most, slots=args.on_demand)
            proc, ports = start_server(config, tmp / "server-on-demand.log")
            try:
                results["configs"][f"on-demand/{most}/{args.on_demand}"] = asyncio.run(
                    over_grpc(ports["port"], plan, args))
            finally:
                stop_server(proc)
    ref = results["configs"][f"grpc/{first}"]
    for name, r in results["configs"].items():
        rows.append([name, r["completed"], r["errors"], r["dropped"], f"{r['req_s']:.2f}", f"{r['tok_s']:.1f}",
                     f"{r['ttft_p50_ms']:.0f}", f"{r['ttft_p99_ms']:.0f}", f"{r['tpot_p50_ms']:.1f}",
                     f"{r['tpot_p99_ms']:.1f}", f"{r['tok_s'] / ref['tok_s']:.2f}"])
    table = markdown_table(["config", "done", "errors", "dropped", "req/s", "tok/s", "TTFT p50 ms", "TTFT p99 ms",
                            "TPOT p50 ms", "TPOT p99 ms", f"tok/s vs grpc/{first}"], rows)
    print(table)
    inproc = results["configs"][f"in-process/{first}"]
    results["grpc_vs_in_process_tpot_p50"] = ref["tpot_p50_ms"] / inproc["tpot_p50_ms"]
    http = results["configs"][f"http/{first}"]
    results["http_vs_in_process_tpot_p50"] = http["tpot_p50_ms"] / inproc["tpot_p50_ms"]
    results["http_vs_in_process_tok_s"] = http["tok_s"] / inproc["tok_s"]
    results["most_vs_fewest_tpot_p50"] = (results["configs"][f"grpc/{max(args.adapters)}"]["tpot_p50_ms"]
                                          / ref["tpot_p50_ms"])
    print(f"\nTPOT p50: grpc/{first} vs in-process {results['grpc_vs_in_process_tpot_p50']:.2f}x; "
          f"grpc/{max(args.adapters)} vs grpc/{first} {results['most_vs_fewest_tpot_p50']:.2f}x; http/{first} vs "
          f"in-process {results['http_vs_in_process_tpot_p50']:.2f}x (tok/s {results['http_vs_in_process_tok_s']:.2f}x)")
    results["table"] = table
    print(f"wrote {write_json('serve_grpc' + ('_quick' if args.quick else ''), results)}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
