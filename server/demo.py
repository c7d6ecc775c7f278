"""The serving half of `adalora demo`: a real adalora.v1 server on a free loopback port over the demo's base
model and adapter store, concurrent Classify requests naming different adapters, their answers, the same texts
through the `openai` package over the server's HTTP API (vLLM's /classify, and /v1/embeddings), and a few lines of
the server's Prometheus metrics, then a graceful stop."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Mapping, Sequence

import grpc
from prometheus_client.parser import text_string_to_metric_families

from adalora.server.app import create_server
from adalora.server.backend import Backend
from adalora.server.client import encoder_inputs, generate_request, selection
from adalora.server.config import ServerConfig
from adalora.server.gen.adalora.v1 import adalora_pb2 as pb
from adalora.server.gen.adalora.v1 import adalora_pb2_grpc as pb_grpc

SHOWN_METRICS = ("adalora_requests", "adalora_adapter_device_bytes", "adalora_adapters")
"""Metric families printed (a counter's family name has no _total)."""


async def _classify_all(port: int, examples: Mapping[str, Sequence[str]]) -> dict[str, list[tuple[str, str, float]]]:
    """Every (adapter, text) as its own Classify RPC, all in flight at once: adapter -> [(text, label, prob)]."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.AdaLoraStub(channel)
        calls = [(adapter, text) for adapter, texts in examples.items() for text in texts]
        replies = await asyncio.gather(*(stub.Classify(pb.ClassifyRequest(adapter=selection(adapter),
                                                                          inputs=encoder_inputs([text])))
                                         for adapter, text in calls))
    answers: dict[str, list[tuple[str, str, float]]] = {adapter: [] for adapter in examples}
    for (adapter, text), reply in zip(calls, replies):
        result = reply.results[0]
        answers[adapter].append((text, result.label, max(s.score for s in result.scores)))
    return answers


def _over_openai(http_port: int, examples: Mapping[str, Sequence[str]]) -> tuple[dict[str, list[str]], int]:
    """(adapter -> labels of its texts from POST /v1/classify, the size of an /v1/embeddings vector) through the
    openai client; its generic post() reaches routes the SDK has no method for."""
    import httpx2
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0)
    labels = {}
    for adapter, texts in examples.items():
        reply = client.post("/classify", body={"model": adapter, "input": list(texts)}, cast_to=httpx2.Response)
        labels[adapter] = [row["label"] for row in reply.json()["data"]]
    adapter, texts = next(iter(examples.items()))
    size = len(client.embeddings.create(model=adapter, input=texts[0]).data[0].embedding)
    return labels, size


def _scrape(metrics_port: int) -> dict:
    """The server's /metrics, by family name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        return {family.name: family for family in text_string_to_metric_families(reply.read().decode())}


def _metric_lines(metrics_port: int) -> list[str]:
    lines = []
    for family in _scrape(metrics_port).values():
        if family.name not in SHOWN_METRICS:
            continue
        for sample in family.samples:
            if sample.name.endswith("_created") or sample.value == 0:
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            lines.append(f"{sample.name}{{{labels}}} {sample.value:g}" if labels else f"{sample.name} {sample.value:g}")
    return lines


async def _run(config: ServerConfig, examples: Mapping[str, Sequence[str]]) -> tuple[dict, tuple, list[str], int]:
    server, port = await create_server(config)
    await server.start()
    try:
        await server.attach(await asyncio.to_thread(Backend.open, config, server.metrics))
        answers = await _classify_all(port, examples)
        http = await asyncio.to_thread(_over_openai, server.http_port, examples)
        lines = await asyncio.to_thread(_metric_lines, server.metrics_port)
    finally:
        await server.stop(grace=5)
    return answers, http, lines, port


def serve_and_classify(base_model: str, adapter_dir: str, examples: Mapping[str, Sequence[str]],
                       device: str) -> None:
    """Start the server with every adapter of `examples` preloaded, classify each text with its adapter
    concurrently over gRPC, print the answers and the metrics, stop."""
    config = ServerConfig(base_model=base_model, adapter_dir=adapter_dir, preload=tuple(examples), port=0,
                          metrics_port=0, http_port=0, device=device, max_slots=max(len(examples), 1))
    answers, (http_labels, size), lines, port = asyncio.run(_run(config, examples))
    total = sum(len(texts) for texts in examples.values())
    print(f"\nserved {len(examples)} adapters on one base over gRPC (127.0.0.1:{port}); "
          f"{total} Classify requests in flight at once:")
    for adapter, rows in answers.items():
        for text, label, prob in rows:
            print(f"  [{adapter}] {text!r} -> {label} ({prob:.2f})")
    same = all(http_labels[a] == [label for _, label, _ in rows] for a, rows in answers.items())
    print(f"the openai client over HTTP (/v1/classify) gives {'the same' if same else 'DIFFERENT'} labels; "
          f"/v1/embeddings: {size}-dimensional vectors")
    print("metrics (from /metrics):")
    for line in lines:
        print(f"  {line}")


# ---- generation: a causal LM and its adapters ---------------------------------------------------------------------

GEN_TOKENS = 24
"""Greedy tokens of each demo answer."""


async def _generate_all(port: int, calls: Sequence[tuple[str, str, object]]) -> list[str]:
    """Every (prompt, name, selection) as its own Generate RPC, all in flight at once (one batch): their texts."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.AdaLoraStub(channel)
        replies = await asyncio.gather(*(stub.Generate(generate_request(prompt, chosen, max_new_tokens=GEN_TOKENS,
                                                                        temperature=0))
                                         for prompt, _, chosen in calls))
    return [reply.text for reply in replies]


def _generate_over_openai(http_port: int, base_name: str, calls: Sequence[tuple[str, str, object]]) -> list[str]:
    """The same calls through the openai client's completions API, concurrently: a mix is the extension field
    "adapters" beside the base's name."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0, timeout=600)

    def one(call: tuple[str, str, object]) -> str:
        prompt, _, chosen = call
        model, extra = (base_name, {"adapters": chosen}) if isinstance(chosen, dict) else (chosen or base_name, None)
        reply = client.completions.create(model=model, prompt=prompt, max_tokens=GEN_TOKENS, temperature=0,
                                          extra_body=extra)
        return reply.choices[0].text

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(one, calls))


def _generation_metrics(metrics_port: int) -> list[str]:
    families = _scrape(metrics_port)
    rows = {s.name: s.value for s in families["adalora_batch_size"].samples if not s.labels.get("le")}
    names = {"": "base", "__mix__": "mixes"}
    tokens = {names.get(s.labels.get("adapter", ""), s.labels.get("adapter")): s.value
              for s in families["adalora_generated_tokens"].samples if s.name.endswith("_total")}
    lines = [f"decode steps {rows['adalora_batch_size_count']:g}, mean rows per step "
             f"{rows['adalora_batch_size_sum'] / max(rows['adalora_batch_size_count'], 1):.1f}",
             "generated tokens: " + ", ".join(f"{a} {v:g}" for a, v in sorted(tokens.items()))]
    return lines


async def _run_generate(config: ServerConfig, calls: Sequence[tuple[str, str, object]]) -> tuple:
    server, port = await create_server(config)
    await server.start()
    try:
        await server.attach(await asyncio.to_thread(Backend.open, config, server.metrics))
        texts = await _generate_all(port, calls)
        http = await asyncio.to_thread(_generate_over_openai, server.http_port, config.model_name, calls)
        lines = await asyncio.to_thread(_generation_metrics, server.metrics_port)
    finally:
        await server.stop(grace=5)
    return texts, http, lines, port


def serve_and_generate(base_model: str, adapter_dir: str, prompts: Sequence[str], selections: Mapping[str, object],
                       device: str) -> None:
    """Serve the causal LM with its adapters preloaded, send every prompt to every selection (the base, each
    adapter, a weighted mix) at once over gRPC, print the answers side by side, the same through the openai
    client, and a few metrics; stop."""
    adapters = sorted({i for chosen in selections.values() if chosen for i in
                       ([chosen] if isinstance(chosen, str) else chosen)})
    config = ServerConfig(base_model=base_model, adapter_dir=adapter_dir, preload=tuple(adapters), port=0,
                          metrics_port=0, http_port=0, device=device, max_slots=max(len(adapters), 1),
                          max_batch_size=max(8, len(prompts) * len(selections)))
    calls = [(prompt, name, chosen) for prompt in prompts for name, chosen in selections.items()]
    texts, http, lines, port = asyncio.run(_run_generate(config, calls))
    print(f"\nserved {config.model_name} with {len(adapters)} adapters from one process over gRPC (127.0.0.1:{port}); "
          f"{len(calls)} Generate requests in one batch, {GEN_TOKENS} greedy tokens each:")
    width = max(len(name) for name in selections)
    for prompt in prompts:
        print(f"\n  prompt: {prompt!r}")
        for (p, name, _), text in zip(calls, texts):
            if p == prompt:
                print(f"    {name:<{width}} | {' '.join(text.split())}")
    same = sum(a == b for a, b in zip(texts, http))
    print(f"\nthe openai client over HTTP (/v1/completions, a mix through \"adapters\") gives the same text for "
          f"{same} of {len(calls)}")
    for line in lines:
        print(f"  {line}")
