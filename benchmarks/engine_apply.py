"""Per-layer cost of each batched-apply strategy, and whether the cost model picks the fastest.

For each batch composition (tokens N, distinct adapters G; token i runs adapter i mod G) this times
`plan.add_to(y, x)` of the group, packed and padded plans (and, in the last column, building each plan:
what a continuously batched decode pays again whenever a request joins or leaves) on the seven projection shapes of one
SmolLM2-135M block (q, k, v, o, gate, up, down), with adapters at the rank pattern of
engine_throughput.py (a layer is 0 with probability 0.08, else 5..12). The strategies run side by side in
one process, in a rotated order each repeat; a cell is the median over repeats of the block's summed time.
The last columns say what `make_plan` under 'auto' (the engine's cost model) picks for the block's layers and how much
slower that is than the fastest strategy: this is the table the CostModel defaults are calibrated on.

    python benchmarks/engine_apply.py [--quick] [--device cpu|cuda] [--dtype ...] [--threads N] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import markdown_table, median, write_json  # noqa: E402
from adalora_runtime.engine.apply import PLANS, Factors, Routing, make_plan  # noqa: E402

INIT_R, R_MIN, P_ZERO = 12, 5, 0.08  # engine_throughput.py's rank pattern
HIDDEN, INTER, KV = 576, 1536, 192  # SmolLM2-135M
BLOCK = {"q": (HIDDEN, HIDDEN), "k": (HIDDEN, KV), "v": (HIDDEN, KV), "o": (HIDDEN, HIDDEN),
         "gate": (HIDDEN, INTER), "up": (HIDDEN, INTER), "down": (INTER, HIDDEN)}  # name: (in, out)
QUICK_BLOCK = {"q": (64, 64), "up": (64, 160), "down": (160, 64)}
DECODE = [(1, 1), (8, 1), (8, 3), (8, 8), (16, 1), (16, 5), (16, 16), (32, 8), (32, 32)]
PREFILL = [(256, 1), (256, 3), (256, 8), (1024, 8)]


def make_factors(in_f: int, out_f: int, groups: int, gen: torch.Generator, device, dtype) -> list[Factors]:
    factors = []
    for _ in range(groups):
        r = 0 if float(torch.rand((), generator=gen)) < P_ZERO else int(torch.randint(R_MIN, INIT_R + 1, (1,), generator=gen))
        factors.append(Factors((torch.randn(r, in_f, generator=gen) * 0.05).to(device, dtype),
                               (torch.randn(out_f, r, generator=gen) * 0.05).to(device, dtype)))
    return factors


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, calls: int, device: torch.device) -> float:
    """Seconds per call over `calls` back-to-back calls."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / calls


def composition(tokens: int, distinct: int, block: dict, args, seed: int) -> dict:
    """Median block time per strategy (microseconds), the fastest, and auto's picks."""
    gen = torch.Generator().manual_seed(seed)
    groups = (torch.arange(tokens) % distinct).to(args.device)
    routing = Routing(groups, distinct)
    layers, picks, builds = [], Counter(), []
    for in_f, out_f in block.values():
        factors = make_factors(in_f, out_f, distinct, gen, args.device, args.dtype)
        ranks = [f.rank for f in factors]
        if sum(ranks) == 0:
            continue  # the engine skips such a layer
        x = torch.randn(tokens, in_f, generator=gen).to(args.device, args.dtype)
        y = torch.zeros(tokens, out_f, device=args.device, dtype=args.dtype)
        plans = {name: plan(routing, factors) for name, plan in PLANS.items()}
        layers.append((plans, x, y))
        builds.append(factors)
        picks[make_plan(routing, factors).strategy] += 1  # exactly what the engine's 'auto' builds
    calls = max(3, args.calls // max(1, tokens // 16))
    samples = {name: [] for name in PLANS}
    names = list(PLANS)
    for repeat in range(args.repeats + 1):  # the first pass warms up and is dropped
        order = names[repeat % len(names):] + names[: repeat % len(names)]
        for name in order:
            total = sum(time_calls(lambda p=plans[name], x=x, y=y: p.add_to(y, x), calls, args.device)
                        for plans, x, y in layers)
            if repeat:
                samples[name].append(total * 1e6)
    us = {name: median(v) for name, v in samples.items()}
    build_us = {name: median([time_calls(lambda: [plan(routing, f) for f in builds], 1, args.device)
                              for _ in range(args.repeats)]) * 1e6 for name, plan in PLANS.items()}
    fastest = min(us, key=us.get)
    auto_us = sum(us[name] * n for name, n in picks.items()) / max(1, sum(picks.values()))
    return {"tokens": tokens, "distinct": distinct, "us": us, "build_us": build_us, "fastest": fastest,
            "auto": dict(picks),
            "auto_vs_fastest": auto_us / us[fastest]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few calls, seconds")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="default float32 on the CPU, bfloat16 on CUDA")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 7; quick 2)")
    ap.add_argument("--calls", type=int, default=None, help="calls per timing at up to 16 tokens (default 200)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.device = torch.device(args.device)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32"))
    args.repeats = args.repeats or (2 if args.quick else 7)
    args.calls = args.calls or (5 if args.quick else 200)
    block = QUICK_BLOCK if args.quick else BLOCK
    started = time.perf_counter()
    rows = [composition(n, g, block, args, seed=i) for i, (n, g) in enumerate(DECODE + PREFILL)]
    headers = ["tokens", "distinct", *(f"{s} us" for s in PLANS), "fastest", "auto picks", "auto / fastest",
               "plan build us (" + " / ".join(PLANS) + ")"]
    table = markdown_table(headers, [[r["tokens"], r["distinct"], *(f"{r['us'][s]:.0f}" for s in PLANS), r["fastest"],
                                      ", ".join(f"{k} {v}" for k, v in sorted(r["auto"].items())),
                                      f"{r['auto_vs_fastest']:.2f}",
                                      " / ".join(f"{r['build_us'][s]:.0f}" for s in PLANS)] for r in rows])
    print(f"one block ({', '.join(block)}), {args.device} {str(args.dtype).removeprefix('torch.')}, "
          f"{args.threads} threads; microseconds per block call, medians of {args.repeats}\n")
    print(table)
    worst = max(r["auto_vs_fastest"] for r in rows)
    print(f"\nauto picks the fastest in {sum(r['auto_vs_fastest'] == 1.0 for r in rows)}/{len(rows)} compositions; "
          f"worst auto / fastest {worst:.2f}")
    payload = {"quick": args.quick, "device": str(args.device), "dtype": str(args.dtype), "threads": args.threads,
               "repeats": args.repeats, "rows": rows, "seconds": time.perf_counter() - started}
    print(f"wrote {write_json('engine_apply' + ('_quick' if args.quick else ''), payload)}")


if __name__ == "__main__":
    main()
