"""Side by side with llama.cpp's llama-server, the server CPU and edge users run: SmolLM2-135M on this machine,
B concurrent greedy requests of N new tokens through each server's HTTP front-end (ours: /v1/completions; the
peer: /completion with its per-request `lora` field), every server started once and the rounds interleaved.

Configurations: base (every row on the base model), one (every row adapter a0), distinct (row i adapter a_i).
Adapters are generated as in engine_throughput.py (AdaLoRA rank patterns 0 or 5..12 on all 7 projections) with
larger factors, so that they change the greedy tokens; the peer gets each as a plain LoRA (`save_peft_lora`,
then llama.cpp's convert_lora_to_gguf.py). llama.cpp scales each tensor by alpha / its own rank, so the export
sets lora_alpha 0, which it reads as scale 1: our factors have lambda and the scale folded in, at each layer's
own rank. The base is converted by llama.cpp's convert_hf_to_gguf.py (f32, bf16, q8_0).

Before timing, both servers must compute the same thing: greedy texts in f32 equal for the base and for a0 on
every prompt over --check-tokens tokens (the run stops if not); agreement over the full length is reported too
(two float32 kernels round differently, so a near-tie may flip a row late). Beware of the peer's
`--lora-init-without-apply`: it leaves every global LoRA scale at 1.0 in this version, so a request without `lora`
would run all adapters at once; the scales are set to 0 with POST /lora-adapters and read back.

Every timed request makes exactly N tokens (ignore_eos on both servers: an early end-of-sequence would shrink the
batch unevenly; the two servers treat the tokens after it differently -- llama.cpp bans end-of-sequence tokens,
we go on past them as vLLM does -- so the equivalence check runs with natural stops). Throughput of one round =
completion tokens of the B requests / wall time from the first send to the last answer (prefill included, as a
client sees it); the table shows medians over --rounds, after one warm-up round.

On a GPU (--device cuda; the peer built with CUDA and run with every layer offloaded, -ngl 999) the same
table runs over a model built from the packaged SmolLM2 config at random weights (--random-weights 135m), or a
1B-class one from the same config with wider and fewer layers (--random-weights 1b: hidden 2048, 16 layers, 32
heads / 8 KV heads, MLP 8192; 1.07B parameters, saved in bfloat16, so that every server reads the same weights).
Random weights make near-ties common, so there the equivalence check is reported and does not stop the run.
--model-dir names the folder whose config and tokenizer are used (default: the packaged SmolLM2 folder);
--prompts a JSON list of prompt texts (default: the packaged movie dialogs).

    make peer                                   # builds .peer/bin/llama-server once (minutes)
    python benchmarks/vs_llamacpp.py [--rounds 5] [--batch 8] [--new-tokens 64] [--ours float32 bfloat16]
                                     [--peer-weights f32 bf16 q8_0] [--peer .peer] [--bf16-weights]
                                     [--pytorch-too] [--eager-too] [--no-gather-too] [--device cuda]
                                     [--random-weights 135m|1b]
                                     [--model-dir DIR] [--prompts FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx2  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM  # noqa: E402

from _common import RESULTS, markdown_table, median, write_json  # noqa: E402
from adalora.adapter import Adapter  # noqa: E402
from adalora.adapter_file import save_adapter  # noqa: E402
from adalora.assets import dataset_path, model_path  # noqa: E402
from adalora.inject import resolve_targets  # noqa: E402
from adalora.layers import linear_dims  # noqa: E402
from adalora.peft_interop import save_peft_lora  # noqa: E402
from adalora.server.config import ServerConfig  # noqa: E402
from engine_throughput import TARGETS, make_adapter  # noqa: E402
from serve_grpc import start_server, stop_server  # noqa: E402

PEER_VERSION = "0.3.36"
CONFIGS = ("base", "one", "distinct")
FACTOR_STD, LAMBDA_STD = 0.3, 0.1
"""Of the generated adapters' factors: large enough that every adapter changes the greedy tokens (checked)."""
RANDOM_SIZES = {"135m": ({}, torch.float32),
                "1b": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=64), torch.bfloat16)}
"""--random-weights: config fields replaced in the packaged SmolLM2 config, and the dtype the weights are saved in."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")


# ---------------------------------------------------------------- assets


def peer_source(peer: Path) -> Path:
    return peer / f"llama_cpp_python-{PEER_VERSION}" / "vendor" / "llama.cpp"


def run_converter(src: Path, script: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    done = subprocess.run([sys.executable, str(src / script), *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{script} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def random_model(source: Path, size: str, out: Path, device: str) -> Path:
    """A model folder (config, tokenizer, seeded random weights) from `source`'s config with RANDOM_SIZES[size]'s
    fields replaced; built once."""
    folder = out / f"random-{size}"
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        return folder
    fields, dtype = RANDOM_SIZES[size]
    config = AutoConfig.from_pretrained(source)
    for key, value in fields.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    with torch.device(device):  # the init of a 1B model is seconds on the GPU, a minute on a few cores
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    return folder


def base_gguf(src: Path, model_dir: Path, out: Path, outtype: str) -> Path:
    path = out / f"{model_dir.name}-{outtype}.gguf"
    if not path.exists():
        run_converter(src, "convert_hf_to_gguf.py", str(model_dir), "--outtype", outtype, "--outfile", str(path))
    return path


def lora_gguf(src: Path, model_dir: Path, adapter: Adapter, out: Path, name: str) -> Path:
    """The adapter as a plain LoRA GGUF with lora_alpha 0 (llama.cpp: scale 1 on every tensor)."""
    path = out / f"{name}.gguf"
    folder = out / f"{name}-lora"
    shutil.rmtree(folder, ignore_errors=True)
    save_peft_lora(adapter, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(lora_alpha=0, alpha_pattern={}, rank_pattern={})
    (folder / "adapter_config.json").write_text(json.dumps(config))
    run_converter(src, "convert_lora_to_gguf.py", "--base", str(model_dir), "--outtype", "f32", "--outfile",
                  str(path), str(folder))
    shutil.rmtree(folder)
    return path


def prompt_texts(count: int) -> list[str]:
    """The first `count` dialogue lines of the packaged movie-dialog data."""
    rows = [json.loads(line) for line in dataset_path("moviedialog", "train").read_text().splitlines()[:count * 4]]
    return [r["prompt"] for r in rows][:count]


def prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    """The texts as token ids, at most 48 each."""
    return [tokenizer(t)["input_ids"][:48] for t in texts]


# ---------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    weights: str
    url: str
    adapters: list[str]
    proc: subprocess.Popen
    client: httpx2.AsyncClient = field(init=False)

    async def complete(self, prompt: list[int], adapter: int | None, new_tokens: int,
                       ignore_eos: bool) -> tuple[str, int]:
        """(text, completion tokens) of one greedy request."""
        raise NotImplementedError


@dataclass
class Ours(Server):
    base_name: str = ""

    async def complete(self, prompt, adapter, new_tokens, ignore_eos):
        body = {"model": self.base_name if adapter is None else self.adapters[adapter], "prompt": prompt,
                "max_tokens": new_tokens, "temperature": 0, "ignore_eos": ignore_eos}
        reply = await self.client.post("/v1/completions", json=body)
        reply.raise_for_status()
        out = reply.json()
        return out["choices"][0]["text"], out["usage"]["completion_tokens"]


@dataclass
class Peer(Server):
    async def complete(self, prompt, adapter, new_tokens, ignore_eos):
        body = {"prompt": prompt, "n_predict": new_tokens, "temperature": 0, "cache_prompt": False,
                "ignore_eos": ignore_eos,
                "lora": [] if adapter is None else [{"id": adapter, "scale": 1.0}]}
        reply = await self.client.post("/completion", json=body)
        reply.raise_for_status()
        out = reply.json()
        return out["content"], out["tokens_predicted"]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_peer(binary: Path, gguf: Path, loras: list[Path], args, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(args.threads),
           "-np", str(args.batch), "-c", str(args.batch * 256), "--lora-init-without-apply", "--no-webui"]
    if args.device != "cpu":
        cmd += ["-ngl", "999"]  # every layer on the GPU
    for lora in loras:
        cmd += ["--lora", str(lora)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"llama-server exited ({proc.returncode}); its log: {log}")
        try:
            if httpx2.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx2.HTTPError:
            pass
        time.sleep(0.5)
    else:
        proc.kill()
        raise SystemExit(f"llama-server did not become healthy in 300 s; its log: {log}")
    httpx2.post(f"{url}/lora-adapters", json=[{"id": i, "scale": 0.0} for i in range(len(loras))]).raise_for_status()
    scales = [a["scale"] for a in httpx2.get(f"{url}/lora-adapters").json()]
    if any(scales):
        raise SystemExit(f"llama-server kept global LoRA scales {scales} after setting them to 0")
    return proc, url


# ---------------------------------------------------------------- measurement


def row_adapters(config: str, batch: int) -> list[int | None]:
    return {"base": [None] * batch, "one": [0] * batch, "distinct": list(range(batch))}[config]


async def round_of(server: Server, ids: list[list[int]], config: str, new_tokens: int,
                   ignore_eos: bool = True) -> dict:
    adapters = row_adapters(config, len(ids))
    start = time.perf_counter()
    answers = await asyncio.gather(*(server.complete(p, a, new_tokens, ignore_eos)
                                     for p, a in zip(ids, adapters)))
    wall = time.perf_counter() - start
    tokens = sum(n for _, n in answers)
    return {"tok_s": tokens / wall, "tokens": tokens, "texts": [t for t, _ in answers]}


def common_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


async def equivalence(ours: Server, peer: Server, ids: list[list[int]], args) -> dict:
    """Greedy texts of both float32 servers for the base and a0: equal over --check-tokens (what must hold), and,
    for information, over the timed length (where a near-tie between two float32 kernels may flip late)."""
    out = {}
    for config in ("base", "one"):
        short_a = (await round_of(ours, ids, config, args.check_tokens, ignore_eos=False))["texts"]
        short_b = (await round_of(peer, ids, config, args.check_tokens, ignore_eos=False))["texts"]
        a = (await round_of(ours, ids, config, args.new_tokens, ignore_eos=False))["texts"]
        b = (await round_of(peer, ids, config, args.new_tokens, ignore_eos=False))["texts"]
        out[config] = {"equal": sum(x == y for x, y in zip(short_a, short_b)), "rows": len(ids),
                       "first_mismatch": next(([x, y] for x, y in zip(short_a, short_b) if x != y), None),
                       "equal_at_full_length": sum(x == y for x, y in zip(a, b)),
                       "differing_rows_agree_for_chars": [common_prefix(x, y) for x, y in zip(a, b) if x != y],
                       "texts": short_a}
    out["adapter_changes"] = sum(x != y for x, y in zip(out["base"]["texts"], out["one"]["texts"]))
    return out


async def measure(servers: list[Server], ids, args) -> dict:
    for server in servers:
        server.client = httpx2.AsyncClient(base_url=server.url, timeout=600)
    f32 = {s.weights: s for s in servers}
    check = await equivalence(f32["float32"], f32["f32"], ids, args) if "f32" in f32 else {}
    for config in ("base", "one") if check else ():
        if check[config]["equal"] != check[config]["rows"] and not args.random_weights:
            raise SystemExit(f"the float32 servers disagree on {config}: {check[config]}")
    rounded = [s.weights for s in servers if isinstance(s, Ours) and s.weights.startswith("bf16")]
    for label in rounded if check else ():  # information: our rounded weights against our float32
        for config in ("base", "one"):
            texts = (await round_of(f32[label], ids, config, args.check_tokens, ignore_eos=False))["texts"]
            check[f"{label} equal to float32 ({config})"] = sum(a == b for a, b in zip(texts, check[config]["texts"]))
    if check and check["adapter_changes"] == 0:
        raise SystemExit("adapter a0 changes no greedy text: the check would not tell adapters apart")
    results = {f"{s.name} {s.weights}": {c: [] for c in CONFIGS} for s in servers}
    for r in range(args.rounds + 1):
        for c in CONFIGS:
            order = servers[r % len(servers):] + servers[:r % len(servers)]  # rotated each round
            for server in order:
                res = await round_of(server, ids, c, args.new_tokens)
                if r > 0:  # round 0 warms up
                    results[f"{server.name} {server.weights}"][c].append(res["tok_s"])
    for server in servers:
        await server.client.aclose()
    return {"equivalence": {k: {kk: vv for kk, vv in v.items() if kk != "texts"} if isinstance(v, dict) else v
                            for k, v in check.items()},
            "tok_s": {name: {c: median(v) for c, v in res.items()} for name, res in results.items()},
            "per_round": results, "batch": len(ids)}


def table(results: dict) -> str:
    rows = []
    ours_base = {k: v["base"] for k, v in results["tok_s"].items() if k.startswith("adalora")}
    for name, res in results["tok_s"].items():
        rows.append([name, f"{res['base']:.0f}", f"{res['one']:.0f}", f"{res['distinct']:.0f}",
                     f"{res['distinct'] / res['base']:.2f}"])
    B = results.get("batch", "B")
    out = markdown_table(["server, weights", f"base x{B} tok/s", f"one adapter x{B}", f"{B} distinct adapters",
                          "distinct / base"], rows)
    peers = [v["distinct"] for k, v in results["tok_s"].items() if k.startswith("llama")]
    if not peers:
        return out
    best_peer = max(peers)
    ratios = [f"{k}: distinct {results['tok_s'][k]['distinct'] / best_peer:.2f}x the peer's best distinct"
              for k in ours_base]
    return out + "\n\n" + "\n".join(ratios)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["tok_s"])
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([c + i * width for c in range(len(CONFIGS))], [results["tok_s"][name][c] for c in CONFIGS], width,
               label=name)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(CONFIGS))], CONFIGS)
    ax.set_ylabel(f"tokens/s ({results.get('batch', 'B')} concurrent requests)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer", type=Path, default=Path(".peer"), help="folder of `make peer`'s build")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--check-tokens", type=int, default=24, help="greedy tokens both float32 servers must agree on")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--ours", nargs="+", default=["float32", "bfloat16"], help="our dtypes (float32 always runs)")
    ap.add_argument("--peer-weights", nargs="+", default=["f32", "bf16", "q8_0"], help="GGUF types (f32 always)")
    ap.add_argument("--decoder", default="auto", help="our --decoder (auto, lean, hf)")
    ap.add_argument("--bf16-weights", action="store_true",
                    help="also run our server over bfloat16 weights, float32 activations (--weights bf16)")
    ap.add_argument("--no-peer", action="store_true", help="time our servers alone (no llama-server)")
    ap.add_argument("--device", default="cpu", help="ours: --device; the peer: -ngl 999 unless cpu")
    ap.add_argument("--random-weights", choices=tuple(RANDOM_SIZES), default=None,
                    help="a model from the packaged config at random weights (see above) instead of SmolLM2's own")
    ap.add_argument("--model-dir", type=Path, default=None, help="config and tokenizer folder (default: SmolLM2)")
    ap.add_argument("--prompts", type=Path, default=None, help="JSON list of prompt texts (default: movie dialogs)")
    ap.add_argument("--no-gather-too", action="store_true",
                    help="also run each of our servers with --gather-ms 0 (a burst's first request prefills alone)")
    ap.add_argument("--eager-too", action="store_true",
                    help="on CUDA, also run each of our dtypes without CUDA graphs (--no-cuda-graphs)")
    ap.add_argument("--pytorch-too", action="store_true",
                    help="also run our float32 server without the native CPU kernels (ADALORA_NATIVE=0)")
    args = ap.parse_args()
    binary, src = args.peer / "bin" / "llama-server", peer_source(args.peer)
    if not args.no_peer and (not binary.exists() or not src.exists()):
        print(f"skipped: llama-server is not built under {args.peer}; run `make peer` first (builds it from the "
              f"llama-cpp-python {PEER_VERSION} sdist, minutes)")
        return
    work = args.peer / "work"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir or model_path("smollm2-135m")
    if args.random_weights:
        model_dir = random_model(model_dir, args.random_weights, work, args.device)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    shapes = {p: linear_dims(model.get_submodule(p)) for p in resolve_targets(model, TARGETS)}
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    adapters = [make_adapter(model, shapes, i, FACTOR_STD, LAMBDA_STD) for i in range(args.batch)]
    for i, adapter in enumerate(adapters):
        save_adapter(adapter, store / f"a{i}")
    loras = [] if args.no_peer else [lora_gguf(src, model_dir, a, work, f"a{i}") for i, a in enumerate(adapters)]
    texts = json.loads(args.prompts.read_text())[: args.batch] if args.prompts else prompt_texts(args.batch)
    ids = prompts(AutoTokenizer.from_pretrained(model_dir), texts)
    servers: list[Server] = []
    try:
        # (label, environment, ServerConfig fields beyond the shared ones) of each of our servers
        dtypes = dict.fromkeys(["float32", *args.ours])
        ours = [(dtype, None, {"dtype": dtype}) for dtype in dtypes]
        if args.eager_too:
            ours += [(f"{dtype} eager", None, {"dtype": dtype, "cuda_graphs": False}) for dtype in dtypes]
        if args.bf16_weights:
            ours.append(("bf16 weights", None, {"weights": "bf16"}))
        if args.pytorch_too:
            ours.append(("float32 no-native", {"ADALORA_NATIVE": "0"}, {}))
        if args.no_gather_too:
            ours += [(f"{label} no-gather", env, {**fields, "gather_ms": 0.0}) for label, env, fields in ours]
        for label, env, fields in ours:
            config = ServerConfig(base_model=str(model_dir), adapter_dir=str(store), device=args.device,
                                  preload=tuple(f"a{i}" for i in range(args.batch)), decoder=args.decoder,
                                  max_batch_size=args.batch, max_slots=args.batch,
                                  max_new_tokens=max(args.new_tokens, 64), **fields)
            proc, ready = start_server(config, work / f"ours-{label.replace(' ', '-')}.log", env)
            servers.append(Ours("adalora", label, f"http://127.0.0.1:{ready['http_port']}",
                                [f"a{i}" for i in range(args.batch)], proc, base_name=model_dir.name))
        for outtype in [] if args.no_peer else dict.fromkeys(["f32", *args.peer_weights]):
            gguf = base_gguf(src, model_dir, work, outtype)
            proc, url = start_peer(binary, gguf, loras, args, work / f"peer-{outtype}.log")
            servers.append(Peer("llama-server", outtype, url, [f"a{i}" for i in range(args.batch)], proc))
        results = asyncio.run(measure(servers, ids, args))
    finally:
        for server in servers:
            stop_server(server.proc)
    results.update(batch=args.batch, new_tokens=args.new_tokens, rounds=args.rounds, threads=args.threads,
                   peer=f"llama.cpp from llama-cpp-python {PEER_VERSION}", decoder=args.decoder, device=args.device,
                   model=model_dir.name, gpu=torch.cuda.get_device_name() if args.device != "cpu" else None)
    print(json.dumps(results["equivalence"], indent=1))
    print(table(results))
    RESULTS.mkdir(exist_ok=True)
    name = "vs_llamacpp" if args.device == "cpu" and not args.random_weights else \
        f"vs_llamacpp-{args.device.split(':')[0]}-{model_dir.name}"
    write_json(name, results)
    plot(results, RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / name}.json and .png")


if __name__ == "__main__":
    main()
