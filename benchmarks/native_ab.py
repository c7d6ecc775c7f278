"""Two builds of the CPU kernels side by side: engine/native.cpp at a git revision (--base) against the working
tree's, both loaded in one process and timed alternately, so that both see the same machine (this VM's speed moves
by 20-50% within minutes, more than a kernel change does).

What is timed: the segment adapter kernel (`segment_lora_add_`) over SmolLM2-135M's decode shapes, 120 calls a
step (its four fused projections, q/k/v, o, gate/up and down, in 30 layers), at engine_throughput.py's rank
pattern, for a decode step of 8 rows with 8 distinct adapters and with one adapter, and for a prefill of 8 prompts
of 40 tokens (8 distinct adapters); factors in float32 and in bfloat16 (what `--weights bf16` reads). A cell is
the median over --repeats of the 120 calls; both builds' outputs are checked equal to float32 rounding first.

    OMP_NUM_THREADS=2 python benchmarks/native_ab.py [--base HEAD] [--repeats 21]   # --base HEAD~1 once committed
    python benchmarks/native_ab.py --quick          # 2 layers, 3 repeats: checks the script
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

from _common import markdown_table, write_json  # noqa: E402
from adalora.engine import native  # noqa: E402
from engine_throughput import INIT_R, R_MIN  # noqa: E402

HIDDEN, INTER, KV = 576, 1536, 192  # SmolLM2-135M
INPUTS = [(HIDDEN, [HIDDEN, KV, KV]), (HIDDEN, [HIDDEN]), (HIDDEN, [INTER, INTER]), (INTER, [HIDDEN])]
"""Each fused projection of a layer: (in, the widths of its adapted parts)."""
ROWS, PROMPT = 8, 40
CASES = {"decode, 8 distinct": (ROWS, 1, ROWS), "decode, one adapter": (ROWS, 1, 1),
         "prefill, 8 distinct": (ROWS, PROMPT, ROWS)}
"""name: (requests, tokens each, distinct adapters): request i runs adapter i mod distinct."""


def build(name: str, source: Path):
    return cpp_extension.load(name=name, sources=[str(source)], extra_cflags=native.FLAGS,
                              extra_ldflags=["-fopenmp"], is_python_module=True, verbose=False)


def layers(n_layers: int, dtype: torch.dtype, gen: torch.Generator) -> list[list[tuple]]:
    """Each call's parts (A (R, in), BT (R, out), offsets, first column), every adapter's ranks in R_MIN..INIT_R."""
    calls = []
    for _ in range(n_layers):
        for in_f, widths in INPUTS:
            parts, column = [], 0
            for width in widths:
                ranks = torch.randint(R_MIN, INIT_R + 1, (ROWS,), generator=gen)
                A = torch.randn(int(ranks.sum()), in_f, generator=gen).to(dtype)
                BT = torch.randn(int(ranks.sum()), width, generator=gen).to(dtype)
                parts.append((A, BT, torch.cat([torch.zeros(1, dtype=torch.long), ranks.cumsum(0)]), column))
                column += width
            calls.append(parts)
    return calls


def run(module, segments: list, xs: list, ys: list) -> float:
    start = time.perf_counter()
    for seg, x, y in zip(segments, xs, ys):
        module.segment_lora_add_(y, x, seg)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="HEAD", help="the git revision whose native.cpp is the baseline (HEAD before "
                    "committing a change, HEAD~1 after)")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if (reason := native.unavailable()) is not None:
        raise SystemExit(f"the CPU kernels do not run here: {reason}")
    n_layers, repeats = (2, 3) if args.quick else (30, args.repeats)
    source = Path(native.SOURCE)
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "native_base.cpp"
        old.write_bytes(subprocess.run(["git", "show", f"{args.base}:./{source.name}"], check=True,
                                       capture_output=True, cwd=source.parent).stdout)
        modules = {"base": build("adalora_native_ab_base", old), "work": build("adalora_native_ab_work", source)}
    gen = torch.Generator().manual_seed(0)
    rows, results = [], {}
    for dtype in (torch.float32, torch.bfloat16):
        calls = layers(n_layers, dtype, gen)
        for case, (requests, each, distinct) in CASES.items():
            groups = torch.arange(requests).repeat_interleave(each) % distinct
            xs = [torch.randn(len(groups), parts[0][0].shape[1], generator=gen) for parts in calls]
            ys = {name: [torch.zeros(len(groups), sum(p[1].shape[1] for p in parts)) for parts in calls]
                  for name in modules}
            segments = {name: [m.Segments(groups, *map(list, zip(*parts))) for parts in calls]
                        for name, m in modules.items()}
            for name, m in modules.items():
                run(m, segments[name], xs, ys[name])
            for a, b in zip(ys["base"], ys["work"]):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
            times = {name: [] for name in modules}
            for repeat in range(repeats):
                order = list(modules) if repeat % 2 == 0 else list(modules)[::-1]  # ABBA: no build always first
                for name in order:
                    times[name].append(run(modules[name], segments[name], xs, ys[name]))
            cell = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            results[f"{dtype} {case}"] = cell
            rows.append([str(dtype).removeprefix("torch."), case, len(groups), f"{cell['base']:.2f}",
                         f"{cell['work']:.2f}", f"{cell['work'] / cell['base']:.3f}"])
    print(markdown_table(["factors", "batch", "tokens", f"{args.base} ms", "working tree ms", "ratio"], rows))
    write_json("native_ab-quick" if args.quick else "native_ab",
               {"base": args.base, "repeats": repeats, "layers": n_layers, "threads": torch.get_num_threads(),
                "results": results})


if __name__ == "__main__":
    main()
