"""Where a GPU decode step's time goes, with and without CUDA graphs (engine.graphs; issue 24): the lean path's
decode step and prefill, in process, over a model built from a config at random weights (SmolLM2-135M's, or the
1B-class one of vs_llamacpp.py), 8 rows after an 8-prompt prefill, for the base, one adapter on every row and 8
distinct adapters. Each cell is the median over --repeats timed blocks of --steps steps (CUDA-synchronised), the
eager and the graph path alternating, so both see the same machine state.

    python benchmarks/graph_step.py --model-dir CONFIG_DIR [--size 135m|1b] [--dtype float32 bfloat16]
    python benchmarks/graph_step.py --device cpu --quick     # a tiny model on the CPU: the static path, no graphs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from _common import markdown_table, write_json  # noqa: E402
from adalora.engine import AdapterEngine, EngineConfig  # noqa: E402
from adalora.engine.graphs import DecodeGraphs  # noqa: E402
from adalora.engine.lean import LeanLlama  # noqa: E402
from adalora.inject import resolve_targets  # noqa: E402
from adalora.layers import linear_dims  # noqa: E402
from engine_throughput import TARGETS, make_adapter  # noqa: E402
from vs_llamacpp import FACTOR_STD, LAMBDA_STD, RANDOM_SIZES  # noqa: E402

ROWS, PROMPT = 8, 24
CONFIGS = ("base", "one", "distinct")


def build(args) -> tuple[AdapterEngine, list[str]]:
    if args.quick:
        config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    else:
        config = AutoConfig.from_pretrained(args.model_dir)
        for key, value in RANDOM_SIZES[args.size][0].items():
            setattr(config, key, value)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    shapes = {p: linear_dims(model.get_submodule(p)) for p in resolve_targets(model, TARGETS)}
    adapters = [make_adapter(model, shapes, i, FACTOR_STD, LAMBDA_STD) for i in range(ROWS)]
    engine = AdapterEngine(model, EngineConfig(max_slots=ROWS))
    ids = [f"a{i}" for i in range(ROWS)]
    for name, adapter in zip(ids, adapters):
        engine.load(name, adapter)
    return engine, ids


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def time_config(engine, lean, selections, graphs: bool, args) -> tuple[float, float]:
    """(prefill ms of ROWS prompts, ms per decode step) of one block."""
    saved = lean.graphs
    if not graphs:
        lean.graphs = None
    try:
        vocab = engine.model.config.vocab_size
        prompts = [[(7 * row + 3 * t) % vocab for t in range(PROMPT)] for row in range(ROWS)]
        lean.clear()
        sync(args.device)
        start = time.perf_counter()
        with engine.batch(engine.context(selections, LeanLlama.prefill_tokens([PROMPT] * ROWS))):
            logits = lean.prefill(prompts)
        sync(args.device)
        prefill = time.perf_counter() - start
        tokens = logits.argmax(-1)
        context = engine.context(selections, 1, calls=args.steps)
        for _ in range(2):  # warm: plans built, graphs captured
            with engine.batch(context):
                tokens = lean.decode(tokens).argmax(-1)
        sync(args.device)
        start = time.perf_counter()
        for _ in range(args.steps):
            with engine.batch(context):
                tokens = lean.decode(tokens).argmax(-1)
        sync(args.device)
        return prefill * 1e3, (time.perf_counter() - start) / args.steps * 1e3
    finally:
        lean.graphs = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=None, help="a folder with the base config (SmolLM2's)")
    ap.add_argument("--size", choices=tuple(RANDOM_SIZES), default="135m")
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="a tiny random Llama (checks the script)")
    args = ap.parse_args()
    if not args.quick and args.model_dir is None:
        ap.error("--model-dir is required (a folder with SmolLM2's config.json), or --quick")
    rows, results = [], {}
    for dtype in args.dtype:
        args.dtype = dtype
        engine, ids = build(args)
        lean = LeanLlama(engine.model, engine.holder, ROWS)
        if lean.graphs is None:  # a CPU: the static step eagerly, what the graphs hold
            lean.graphs = DecodeGraphs(lean, capture=False)
        selections = {"base": [None] * ROWS, "one": [ids[0]] * ROWS, "distinct": list(ids)}
        for config in CONFIGS:
            times = {True: [], False: []}
            for _ in range(args.repeats):
                for graphs in (False, True):
                    times[graphs].append(time_config(engine, lean, selections[config], graphs, args))
            cell = {("graphs" if g else "eager"): {"prefill_ms": statistics.median(p for p, _ in t),
                                                  "step_ms": statistics.median(s for _, s in t)}
                    for g, t in times.items()}
            results[f"{dtype} {config}"] = cell
            e, g = cell["eager"], cell["graphs"]
            rows.append([dtype, config, f"{e['step_ms']:.2f}", f"{g['step_ms']:.2f}",
                         f"{e['step_ms'] / g['step_ms']:.1f}x", f"{ROWS / g['step_ms'] * 1e3:.0f}",
                         f"{e['prefill_ms']:.1f}", f"{g['prefill_ms']:.1f}"])
        del engine, lean
    print(markdown_table(["dtype", "rows", "eager step ms", "graph step ms", "speed-up", "graph tok/s (step only)",
                          "eager prefill ms", "routed prefill ms"], rows))
    name = f"graph_step-{args.device.split(':')[0]}-{'quick' if args.quick else args.size}"
    write_json(name, {"rows": ROWS, "prompt": PROMPT, "steps": args.steps, "repeats": args.repeats,
                      "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                      "results": results})


if __name__ == "__main__":
    main()
