"""Decode throughput of the multi-adapter engine on SmolLM2-135M vs base only, PEFT LoRA and edge mode.

Adapters are generated: per-layer ranks in 0..init_r=12 (a layer is 0 with probability 0.08, else 5..12,
mean about 8) on all 7 llama projections, random small factors. Each batch has B requests of the same
PROMPT_LEN random token ids (no padding) and generates exactly N new tokens greedily (eos ignored).

Configurations, per batch size (every one runs in this process, in a rotated order each repeat; medians; "vs
base" is the median over repeats of each run's throughput over its base run: the same repeat's, or with
--paired the base run made right before it):
- base:               our Generator, every row on the base model (no adapter); the reference of the ratios
- hf-base:            transformers `generate` on the plain base (the loop PEFT runs in)
- ours/<mix>/<strat>: our Generator with the rows' adapters drawn by <mix>, under each apply strategy
  (auto = the cost model, then group, packed, padded forced):
    one      every row the same adapter (1 loaded)
    distinct 8 loaded, row i runs adapter i mod 8 (8 distinct in a batch of 8)
    zipf8    8 loaded, each row draws one with Zipf(1) popularity
    zipf64   64 loaded, Zipf(1) draws (at most B distinct)
- peft-mixed:         PEFT LoRA at each adapter's max rank (PEFT pads a layer's rank; zeros where AdaLoRA
                      kept none; same deltas as ours), the `distinct` rows through `generate(adapter_names=...)`
- peft-sequential:    the same rows one request at a time, `set_adapter` before each
- edge:               one adapter merged into the weights by EdgeMerger, then the base loop of `base`
Also: PEFT's mixed batch over AdaLoRA adapters (its error message is recorded), slot load time of one
compact adapter, edge swap time, the strategy `auto` picks per layer (decode) and whether it is the
fastest forced strategy, and whether ours and PEFT's mixed batch produce the same greedy tokens.

Decode tokens/s counts the tokens after each row's first and the time after the prefill step: in our
Generator, steps 2.. (the first step prefills and decodes once: prefill = its time minus a median decode
step); in `generate`, the time between the streamer's second call and its last.

    python benchmarks/engine_throughput.py --quick        # tiny random llama, seconds
    python benchmarks/engine_throughput.py [--device cuda] [--threads N] [--repeats 3] [--batches 8 16]
                                           [--new-tokens 64] [--no-peft]
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from _common import RESULTS, markdown_table, median, write_json  # noqa: E402
from adalora.adapter import Adapter, AdapterLayer, base_identity  # noqa: E402
from adalora.dtypes import DTYPES  # noqa: E402
from adalora.dtypes import resolve as resolve_dtype  # noqa: E402
from adalora.engine import (AdapterEngine, EdgeMerger, EngineConfig, GenerationRequest, Generator,  # noqa: E402
                                    GeneratorConfig, SamplingParams)
from adalora.inject import resolve_targets  # noqa: E402
from adalora.layers import linear_dims  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INIT_R, LORA_ALPHA, P_ZERO, R_MIN = 12, 16.0, 0.08, 5
STRATEGIES = ("auto", "group", "packed", "padded")
MIXES = {"one": 1, "distinct": 8, "zipf8": 8, "zipf64": 64}  # mix -> adapters loaded


# ---------------------------------------------------------------- setup


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return torch.device(name)


def load_base(quick: bool, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    if quick:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False))
    else:
        from adalora.assets import model_path
        model = AutoModelForCausalLM.from_pretrained(model_path("smollm2-135m"), dtype=torch.float32)
    return model.to(device=device, dtype=dtype).eval()


def make_adapter(model: torch.nn.Module, shapes: dict[str, tuple[int, int]], seed: int, std: float = 0.05,
                 lam_std: float = 1.0) -> Adapter:
    """Random factors at a realistic AdaLoRA rank pattern: some layers 0, the rest R_MIN..INIT_R; P and Q with
    standard deviation `std`, lambda `lam_std`."""
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for path, (in_f, out_f) in shapes.items():
        if float(torch.rand((), generator=gen)) < P_ZERO:
            continue
        r = int(torch.randint(R_MIN, INIT_R + 1, (1,), generator=gen))
        layers[path] = AdapterLayer(torch.randn(out_f, r, generator=gen) * std, torch.randn(r, generator=gen) * lam_std,
                                    torch.randn(r, in_f, generator=gen) * std)
    return Adapter(base=base_identity(model), shapes=shapes, layers=layers, init_r=INIT_R, lora_alpha=LORA_ALPHA)


def zipf_rows(rows: int, loaded: int, seed: int) -> list[int]:
    weights = [1.0 / (k + 1) for k in range(loaded)]
    return random.Random(seed).choices(range(loaded), weights=weights, k=rows)


def row_adapters(mix: str, rows: int, seed: int) -> list[int]:
    """Index into the loaded adapters of each row under `mix`."""
    if mix == "one":
        return [0] * rows
    if mix == "distinct":
        return [i % MIXES[mix] for i in range(rows)]
    return zipf_rows(rows, MIXES[mix], seed)


# ---------------------------------------------------------------- timed runs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(engine: AdapterEngine, prompts: list[list[int]], adapters: list, new_tokens: int,
             strategy: str = "auto") -> dict:
    """One batch through our Generator; each step timed on its own."""
    gen = Generator(engine, GeneratorConfig(max_batch_size=len(prompts), eos_token_ids=(), strategy=strategy))
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    handles = [gen.submit(GenerationRequest(p, a, params)) for p, a in zip(prompts, adapters)]
    steps = []
    while gen.has_work():
        sync(engine.device)
        t0 = time.perf_counter()
        gen.step()
        sync(engine.device)
        steps.append(time.perf_counter() - t0)
    decode = steps[1:]
    step = median(decode) if decode else 0.0
    return {"prefill_s": max(steps[0] - step, 0.0), "decode_s": sum(decode),
            "decode_tokens": len(prompts) * (new_tokens - 1), "tokens": [h.result.token_ids for h in handles]}


class _Clock:
    """A `generate` streamer that only records when each call happens (the first is the prompt)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def put(self, value: torch.Tensor) -> None:
        sync(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.no_grad()
def run_hf(model, prompts: list[list[int]], new_tokens: int, device: torch.device, **kwargs) -> dict:
    """One batch through transformers `generate` (greedy, exactly new_tokens); prefill / decode split by a clock."""
    ids = torch.tensor(prompts, device=device)
    clock = _Clock(device)
    sync(device)
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, streamer=clock, pad_token_id=0, **kwargs)
    first, last = clock.times[1], clock.times[-1]
    return {"prefill_s": first - start, "decode_s": last - first, "decode_tokens": len(prompts) * (new_tokens - 1),
            "tokens": out[:, ids.shape[1]:].tolist()}


def run_sequential(model, prompts: list[list[int]], names: list[str], new_tokens: int, device: torch.device) -> dict:
    """PEFT's switching path: one request at a time, set_adapter before each."""
    parts = []
    for prompt, name in zip(prompts, names):
        model.set_adapter(name)
        parts.append(run_hf(model, [prompt], new_tokens, device))
    return {key: sum(p[key] for p in parts) for key in ("prefill_s", "decode_s", "decode_tokens")} | {
        "tokens": [p["tokens"][0] for p in parts]}


# ---------------------------------------------------------------- PEFT


def peft_lora(model, adapters: list[Adapter], names: list[str]):
    """PEFT LoRA copies of `adapters`: r = the adapter's max rank (lower layers zero-padded), lora_A = Q * lam *
    scale, lora_B = P, lora_alpha = r (PEFT scaling 1), so each computes its AdaLoRA adapter's delta."""
    from peft import LoraConfig, get_peft_model

    peft_model = None
    for adapter, name in zip(adapters, names):
        r = max(layer.rank for layer in adapter.layers.values())
        config = LoraConfig(r=r, lora_alpha=r, target_modules=list(TARGETS), lora_dropout=0.0)
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
        inner = peft_model.base_model.model
        with torch.no_grad():
            for path in adapter.shapes:
                module, layer = inner.get_submodule(path), adapter.layers.get(path)
                A, B = module.lora_A[name].weight, module.lora_B[name].weight  # (r, in), (out, r)
                A.zero_(), B.zero_()
                if layer is not None:
                    A[: layer.rank] = (layer.Q.float() * (layer.lam.float() * adapter.scale)[:, None]).to(A)
                    B[:, : layer.rank] = layer.P.to(B)
    return peft_model.eval()


def peft_adalora_mixed_error(model, adapters: list[Adapter], prompt: list[int], device: torch.device) -> str:
    """Try PEFT's mixed batch (adapter_names) on two AdaLoRA adapters; the error it gives, or 'no error'."""
    from peft import PeftModel

    from adalora.peft_interop import save_peft

    with tempfile.TemporaryDirectory() as tmp:
        dirs = [save_peft(a, Path(tmp) / f"ada{i}") for i, a in enumerate(adapters[:2])]
        peft_model = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name="ada0")
        peft_model.load_adapter(str(dirs[1]), adapter_name="ada1")
        try:
            run_hf(peft_model.eval(), [prompt, prompt], 2, device, adapter_names=["ada0", "ada1"])
        except Exception as e:  # noqa: BLE001 - the point is to record whatever PEFT raises
            return f"{type(e).__name__}: {e}"
    return "no error"


# ---------------------------------------------------------------- other measurements


def slot_load_ms(engine: AdapterEngine, adapter: Adapter, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(engine.device)
        t0 = time.perf_counter()
        engine.load("timed", adapter)
        sync(engine.device)
        times.append(time.perf_counter() - t0)
        engine.unload("timed")
    return median(times) * 1e3


def edge_swap_ms(merger: EdgeMerger, adapters: list[Adapter], repeats: int, device: torch.device) -> float:
    merger.activate(adapters[0])
    times = []
    for i in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        merger.activate(adapters[(i + 1) % 2])
        sync(device)
        times.append(time.perf_counter() - t0)
    return median(times) * 1e3


def auto_choice(engine: AdapterEngine, rows: list, tokens_per_row: int, calls: int) -> dict[str, int]:
    """Layers per strategy that `auto` picks for this batch over `calls` forwards (plans built without
    running the model)."""
    context = engine.context(rows, tokens_per_row, "auto", calls)
    for layer in engine.layers.values():
        context.plan(layer.bank)
    return dict(context.chosen_strategies())


# ---------------------------------------------------------------- driver


def configurations(batch: int, setup: dict) -> dict[str, Callable[[], dict]]:
    """name -> a zero-argument run of one batch of `batch` requests."""
    prompts, n, device = setup["prompts"][:batch], setup["new_tokens"], setup["device"]
    engine, ids = setup["engine"], setup["ids"]
    runs: dict[str, Callable[[], dict]] = {
        "base": lambda: run_ours(engine, prompts, [None] * batch, n),
        "hf-base": lambda: run_hf(setup["plain"], prompts, n, device),
        "edge": lambda: run_ours(setup["edge_engine"], prompts, [None] * batch, n),
    }
    for mix in MIXES:
        rows = [ids[i] for i in setup["rows"][batch][mix]]
        for strategy in STRATEGIES:
            runs[f"ours/{mix}/{strategy}"] = lambda rows=rows, s=strategy: run_ours(engine, prompts, rows, n, s)
    if setup["peft"] is not None:
        names = [f"l{i}" for i in setup["rows"][batch]["distinct"]]
        runs["peft-mixed"] = lambda: run_hf(setup["peft"], prompts, n, device, adapter_names=names)
        runs["peft-sequential"] = lambda: run_sequential(setup["peft"], prompts, names, n, device)
    return runs


def measure(runs: dict[str, Callable[[], dict]], repeats: int,
            paired: bool = False) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """Every run once per repeat, in an order rotated by one each repeat; one warm-up of each first. paired:
    a base run right before every other run, so each ratio compares two runs seconds apart. Returns (samples
    by name, the base sample each run is compared with, by name)."""
    started = time.perf_counter()
    for run in runs.values():
        run()
    print(f"  warm-up of {len(runs)} configurations: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    names, samples = list(runs), {name: [] for name in runs}
    for r in range(repeats):
        started = time.perf_counter()
        for name in names[r % len(names):] + names[: r % len(names)]:
            if paired and name == "base":
                continue  # base runs before every other configuration instead
            if paired:
                samples["base"].append(runs["base"]())
            samples[name].append(runs[name]())
        print(f"  repeat {r + 1}/{repeats}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    if not paired:  # every run of a repeat against that repeat's one base run
        return samples, {name: samples["base"] for name in runs}
    per = len(runs) - 1  # base runs per repeat; the k-th non-base run of a repeat follows its k-th base run
    bases, order = {name: [] for name in runs}, []
    for r in range(repeats):
        order += [n for n in names[r % len(names):] + names[: r % len(names)] if n != "base"]
    for base_run, name in zip(samples["base"], order):
        bases[name].append(base_run)
    bases["base"] = samples["base"]
    assert all(len(bases[n]) == len(samples[n]) for n in runs) and len(samples["base"]) == per * repeats
    return samples, bases


def summarize(samples: list[dict]) -> dict:
    decode = [s["decode_tokens"] / s["decode_s"] for s in samples]
    return {"decode_tok_s": median(decode), "decode_tok_s_all": decode,
            "prefill_ms": median([s["prefill_s"] for s in samples]) * 1e3, "tokens": samples[-1]["tokens"]}


def build(args, device: torch.device, dtype: torch.dtype) -> dict:
    plain = load_base(args.quick, device, dtype)
    shapes = {p: linear_dims(plain.get_submodule(p)) for p in resolve_targets(plain, TARGETS)}
    adapters = [make_adapter(plain, shapes, seed=i) for i in range(max(MIXES.values()))]
    engine = AdapterEngine(copy.deepcopy(plain), EngineConfig(max_slots=len(adapters) + 1))
    ids = [f"a{i}" for i in range(len(adapters))]
    for name, adapter in zip(ids, adapters):
        engine.load(name, adapter)
    edge_model = copy.deepcopy(plain)
    merger = EdgeMerger(edge_model)
    swap_ms = edge_swap_ms(merger, adapters, args.repeats * 3, device)
    merger.activate(adapters[0])
    rng = random.Random(0)
    vocab = plain.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(max(args.batches))]
    rows = {b: {mix: row_adapters(mix, b, seed=b) for mix in MIXES} for b in args.batches}
    setup = {"plain": plain, "engine": engine, "ids": ids, "adapters": adapters, "prompts": prompts, "rows": rows,
             "new_tokens": args.new_tokens, "device": device, "edge_swap_ms": swap_ms,
             "edge_engine": AdapterEngine(edge_model, EngineConfig(max_slots=1)), "peft": None}
    if not args.no_peft:
        setup["peft_adalora_error"] = peft_adalora_mixed_error(copy.deepcopy(plain), adapters, prompts[0], device)
        setup["peft"] = peft_lora(copy.deepcopy(plain), adapters[: MIXES["distinct"]],
                                  [f"l{i}" for i in range(MIXES["distinct"])])
    setup["slot_load_ms"] = slot_load_ms(engine, adapters[0], max(5, args.repeats * 3))
    return setup


def batch_results(batch: int, setup: dict, repeats: int, only: str | None = None, paired: bool = False) -> dict:
    runs = configurations(batch, setup)
    if only is not None:  # always with base, the reference of every ratio
        runs = {name: run for name, run in runs.items() if name == "base" or re.fullmatch(only, name)}
    samples, bases = measure(runs, repeats, paired)
    stats = {name: summarize(s) for name, s in samples.items()}
    for name, s in stats.items():  # each run over the base run it is paired with, then the median
        base = [b["decode_tokens"] / b["decode_s"] for b in bases[name]]
        s["vs_base"] = median([t / b for t, b in zip(s["decode_tok_s_all"], base)])
    choices = {}
    for mix in MIXES:
        forced = {s: stats[f"ours/{mix}/{s}"]["decode_tok_s"] for s in STRATEGIES[1:] if f"ours/{mix}/{s}" in stats}
        if f"ours/{mix}/auto" not in stats or len(forced) < 2:
            continue  # --only left auto, or all but one forced strategy, of this mix out
        rows = [setup["ids"][i] for i in setup["rows"][batch][mix]]
        # what the Generator's decode context asks for: the batch stays together for its new tokens after the
        # first (which the prefill gave); a prefill runs once
        picked = auto_choice(setup["engine"], rows, 1, setup["new_tokens"] - 1)
        fastest = max(forced, key=forced.get)
        choices[mix] = {"auto_layers": picked, "prefill_auto_layers": auto_choice(
            setup["engine"], rows, len(setup["prompts"][0]), 1), "fastest_forced": fastest,
            "auto_is_fastest": set(picked) == {fastest},
            "auto_vs_fastest": stats[f"ours/{mix}/auto"]["decode_tok_s"] / forced[fastest],
            "distinct": len(set(rows))}
    agree = None
    if "peft-mixed" in stats and "ours/distinct/auto" in stats:
        agree = stats["peft-mixed"]["tokens"] == stats["ours/distinct/auto"]["tokens"]
    for s in stats.values():
        del s["tokens"]
    return {"configs": stats, "auto": choices, "peft_mixed_tokens_equal_ours": agree}


def table(results: dict) -> str:
    rows = []
    for batch, res in results["batches"].items():
        for name, s in res["configs"].items():
            rows.append([batch, name, f"{s['decode_tok_s']:.1f}", f"{s['vs_base']:.2f}", f"{s['prefill_ms']:.1f}"])
    return markdown_table(["batch", "configuration", "decode tok/s", "vs base", "prefill ms"], rows)


def auto_table(results: dict) -> str:
    rows = []
    for batch, res in results["batches"].items():
        for mix, c in res["auto"].items():
            rows.append([batch, mix, c["distinct"], c["auto_layers"], c["fastest_forced"], c["auto_is_fastest"],
                         f"{c['auto_vs_fastest']:.2f}"])
    return markdown_table(["batch", "mix", "distinct", "auto picks (decode layers)", "fastest forced (of those run)",
                           "match", "auto / fastest"], rows)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(results["batches"])
    fig, axes = plt.subplots(len(batches), 1, figsize=(12, 4 * len(batches)), squeeze=False)
    for ax, batch in zip(axes[:, 0], batches):
        configs = results["batches"][batch]["configs"]
        ax.bar(range(len(configs)), [c["decode_tok_s"] for c in configs.values()])
        ax.axhline(configs["base"]["decode_tok_s"], color="gray", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(configs)), list(configs), rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"batch {batch} ({results['device']}, {results['dtype']}); dashed: base only")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny random llama, a few tokens, seconds")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                    help="auto: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (default: all cores)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per configuration (default 3; quick 2)")
    ap.add_argument("--no-peft", action="store_true", help="skip the PEFT configurations")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 8 16; quick 8 16)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens generated per request (default 64; quick 6)")
    ap.add_argument("--only", default=None, metavar="REGEX",
                    help="run only the configurations whose name matches (base always runs), e.g. 'ours/distinct/.*'")
    ap.add_argument("--paired", action="store_true",
                    help="run base right before every other configuration (twice the time): ratios from runs "
                         "seconds apart, for a machine whose speed drifts within a repeat")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = DTYPES[resolve_dtype(args.dtype, device)]
    args.batches = tuple(args.batches or (8, 16))
    args.prompt_len = 8 if args.quick else 32
    args.new_tokens = args.new_tokens or (6 if args.quick else 64)
    if min(args.batches) < 1 or args.new_tokens < 2:
        raise SystemExit("--batches must be >= 1 and --new-tokens >= 2 (decode is timed from the second token)")
    args.repeats = args.repeats or (2 if args.quick else 3)
    started = time.perf_counter()
    setup = build(args, device, dtype)
    results = {
        "quick": args.quick, "model": "tiny-random-llama" if args.quick else "smollm2-135m", "device": str(device),
        "dtype": str(dtype).removeprefix("torch."), "threads": args.threads, "repeats": args.repeats,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "init_r": INIT_R,
        "mean_rank": median([sum(a.ranks().values()) / len(a.shapes) for a in setup["adapters"]]),
        "slot_load_ms": setup["slot_load_ms"], "edge_swap_ms": setup["edge_swap_ms"],
        "adapter_bytes": setup["engine"].nbytes("a0"),
        "peft_adalora_mixed_batch_error": setup.get("peft_adalora_error"),
        "only": args.only, "paired": args.paired,
        "batches": {b: batch_results(b, setup, args.repeats, args.only, args.paired) for b in args.batches},
    }
    results["seconds"] = time.perf_counter() - started
    print(table(results), "\n")
    print(auto_table(results), "\n")
    print(f"slot load {results['slot_load_ms']:.2f} ms, edge swap {results['edge_swap_ms']:.2f} ms, "
          f"adapter {results['adapter_bytes'] / 2**20:.2f} MiB, mean rank {results['mean_rank']:.1f}")
    print(f"PEFT mixed batch on AdaLoRA adapters: {results['peft_adalora_mixed_batch_error']}")
    name = f"engine_throughput{'_quick' if args.quick else ''}{'_only' if args.only else ''}"
    print(f"wrote {write_json(name, results)} in {results['seconds']:.0f} s")
    plot(results, RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
