"""Per-layer cost of each batched-apply strategy, and whether the cost model picks the fastest.

For each batch composition (tokens N, distinct adapters G; token i runs adapter i mod G) this times
`plan.add_to(y, x)` of the group, packed and padded plans (and, in the last column, building each plan:
what a continuously batched decode pays again whenever a request joins or leaves) on the seven projection shapes of one
SmolLM2-135M block (q, k, v, o, gate, up, down), with adapters at the rank pattern of
engine_throughput.py (a layer is 0 with probability 0.08, else 5..12). The strategies run side by side in
one process, in a rotated order each repeat; a cell is the median over repeats of the block's summed time.
The last columns say what `make_plan` under 'auto' (the engine's cost model) picks for the block's layers and how much
slower that is than the fastest strategy, over a plan's life of 1 call (a prefill, or a decode batch that changes at
every step: the build counts in full) and of LIFE calls (a decode batch that stays together: the build shared over
LIFE steps). It ends with the CostModel fitted to the table (`engine.calibrate`), which the defaults are, on
the CPU of docs/BENCHMARKS.md; on another device pass the one it prints as EngineConfig(cost=...).

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
from adalora.engine.apply import PLANS, Factors, Routing  # noqa: E402
from adalora.engine.cost import COST_PARAMETERS, DEFAULT_COST, CostModel, choose_strategy, cost_terms  # noqa: E402
from adalora.engine.calibrate import fit_cost_model  # noqa: E402

INIT_R, R_MIN, P_ZERO = 12, 5, 0.08  # engine_throughput.py's rank pattern
HIDDEN, INTER, KV = 576, 1536, 192  # SmolLM2-135M
BLOCK = {"q": (HIDDEN, HIDDEN), "k": (HIDDEN, KV), "v": (HIDDEN, KV), "o": (HIDDEN, HIDDEN),
         "gate": (HIDDEN, INTER), "up": (HIDDEN, INTER), "down": (INTER, HIDDEN)}  # name: (in, out)
QUICK_BLOCK = {"q": (64, 64), "up": (64, 160), "down": (160, 64)}
DECODE = [(1, 1), (8, 1), (8, 3), (8, 8), (16, 1), (16, 5), (16, 16), (32, 8), (32, 32)]
PREFILL = [(256, 1), (256, 3), (256, 8), (1024, 8)]
LIFE = 64  # the decode steps of engine_throughput.py's requests


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
    """Median block time per strategy and per plan build (microseconds), and each layer's (summed rank, max
    rank, whether a padded plan pre-gathers): what a cost model decides by."""
    gen = torch.Generator().manual_seed(seed)
    groups = (torch.arange(tokens) % distinct).to(args.device)
    routing = Routing(groups, distinct)
    layers, builds, shapes = [], [], []
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
        shapes.append((sum(ranks), max(ranks), plans["padded"].index is None))
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
    build_us = {name: median([time_calls(lambda: [plan(routing, f) for f in builds], 1, args.device)
                              for _ in range(args.repeats)]) * 1e6 for name, plan in PLANS.items()}
    return {"tokens": tokens, "distinct": distinct, "us": {name: median(v) for name, v in samples.items()},
            "build_us": build_us, "layers": shapes,
            "segment": all(plans["segment"].native for plans, _, _ in layers)}  # its native kernel ran


def lives(row: dict) -> tuple[int, ...]:
    """Plan lives (calls) a composition is judged at: a prefill runs once."""
    return (1, LIFE) if row["tokens"] <= 32 else (1,)


def judge(row: dict, cost: CostModel, life: int) -> dict:
    """What 'auto' under `cost` picks for the block's layers (make_plan's own choice, layer by layer), the
    fastest strategy per forward with its plan's build shared over `life` calls, and auto / fastest."""
    picks = Counter(choose_strategy(row["tokens"], row["distinct"], sum_rank, max_rank, cost, pregathers, life,
                                    row["segment"])
                    for sum_rank, max_rank, pregathers in row["layers"])
    total = {name: row["us"][name] + row["build_us"][name] / life for name in PLANS
             if name != "segment" or row["segment"]}  # without its kernel, auto never offers segment
    fastest = min(total, key=total.get)
    auto_us = sum(total[name] * n for name, n in picks.items()) / max(1, sum(picks.values()))
    return {"fastest": fastest, "auto": dict(picks), "auto_vs_fastest": auto_us / total[fastest]}


def equations(rows: list[dict]) -> list[tuple[Counter, float]]:
    """One (the block's summed cost terms, microseconds) per strategy's call and per plan build of every
    composition: what `fit_cost_model` reads. Padded calls of a block where a plan would not pre-gather (it
    gathers per call) and group builds (nothing to build) are left out, and so is segment: its native kernel is
    not the PyTorch matmul the other terms measure, so it is priced by the same launch and unit, not fitted."""
    out = []
    for r in rows:
        for name in (n for n in PLANS if n != "segment"):
            for build in (False, True):
                if (build and name == "group") or (not build and name == "padded" and not all(
                        pregathers for _, _, pregathers in r["layers"])):
                    continue
                terms = Counter()
                for sum_rank, max_rank, _ in r["layers"]:
                    terms.update(cost_terms(name, r["tokens"], r["distinct"], sum_rank, max_rank, build))
                out.append((terms, r["build_us" if build else "us"][name]))
    return out


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
    headers = ["tokens", "distinct", "life (calls)", *(f"{s} us" for s in PLANS),
               "plan build us (" + " / ".join(PLANS) + ")", "fastest over the life", "auto picks", "auto / fastest"]
    cases = [(r, life, judge(r, DEFAULT_COST, life)) for r in rows for life in lives(r)]
    table = markdown_table(headers, [[r["tokens"], r["distinct"], life, *(f"{r['us'][s]:.0f}" for s in PLANS),
                                      " / ".join(f"{r['build_us'][s]:.0f}" for s in PLANS), c["fastest"],
                                      ", ".join(f"{k} {v}" for k, v in sorted(c["auto"].items())),
                                      f"{c['auto_vs_fastest']:.2f}"] for r, life, c in cases])
    print(f"one block ({', '.join(block)}), {args.device} {str(args.dtype).removeprefix('torch.')}, "
          f"{args.threads} threads; microseconds per block call, medians of {args.repeats}; 'fastest' and "
          f"'auto / fastest' per forward with the plan build shared over the life\n")
    print(table)
    fitted = fit_cost_model(equations(rows))
    summary = {}
    for label, cost in (("the default CostModel", DEFAULT_COST), ("the model fitted here", fitted)):
        ratios = [judge(r, cost, life)["auto_vs_fastest"] for r in rows for life in lives(r)]
        summary[label] = ratios
        print(f"\nauto under {label} picks the fastest in {sum(x == 1.0 for x in ratios)}/{len(ratios)} cases; "
              f"worst auto / fastest {max(ratios):.2f}, mean {sum(ratios) / len(ratios):.3f}")
    print("\nfitted to this table (pass it as EngineConfig(cost=...) on this device):\n  CostModel("
          + ", ".join(f"{n}={getattr(fitted, n):.4g}" for n in COST_PARAMETERS) + ")")
    payload = {"fitted": {n: getattr(fitted, n) for n in COST_PARAMETERS}, "summary": summary,
               "quick": args.quick, "device": str(args.device), "dtype": str(args.dtype), "threads": args.threads,
               "repeats": args.repeats, "rows": rows, "seconds": time.perf_counter() - started}
    print(f"wrote {write_json('engine_apply' + ('_quick' if args.quick else ''), payload)}")


if __name__ == "__main__":
    main()
