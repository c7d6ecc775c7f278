"""Where one decode step's time goes, against the byte limit (issue 24): SmolLM2-135M, a batch of B rows after a
PROMPT_LEN-token prefill, through the Generator's lean forward (engine.lean) or the plain transformers forward
(--decoder hf, the path before it), profiled per op class.

The byte limit: a decode step must read every weight once (the tied embedding as the lm_head), so at the machine's
memory bandwidth it cannot take less than weight_bytes / bandwidth. Bandwidth is measured here by copying a tensor
far larger than the caches (a copy reads and writes: bytes moved = 2 x size). Reported: ms per step by op class
(linears, attention, norms and activations, cache and index ops, the rest), the step's tokens/s, the limit's
tokens/s, and the linears' effective read bandwidth (weight bytes / linear ms).

    OMP_NUM_THREADS=2 python benchmarks/decode_profile.py [--batch 8] [--steps 20] [--dtype float32|bfloat16]
                                                          [--decoder lean|hf]
    python benchmarks/decode_profile.py --quick          # tiny random llama, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from _common import markdown_table, write_json  # noqa: E402
from adalora.dtypes import DTYPES  # noqa: E402
from adalora.dtypes import resolve as resolve_dtype  # noqa: E402
from adalora.engine.lean import LeanLlama  # noqa: E402
from adalora.engine.multi_linear import ContextHolder  # noqa: E402
from engine_throughput import load_base  # noqa: E402

PROMPT_LEN = 32
CLASSES = (
    ("linear", ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul", "aten::_mkldnn",
                "mkldnn::_linear", "adalora_native::skinny_linear")),
    ("attention", ("aten::scaled_dot_product", "aten::_scaled_dot_product", "aten::softmax", "aten::_softmax",
                   "aten::_flash")),
    ("norm+act", ("aten::rsqrt", "aten::pow", "aten::mean", "aten::silu", "aten::mul", "aten::add", "aten::neg",
                  "aten::cos", "aten::sin")),
    ("cache+index", ("aten::cat", "aten::copy_", "aten::index", "aten::slice", "aten::embedding", "aten::_to_copy",
                     "aten::contiguous", "aten::clone")),
)
"""Op class by name prefix of profiler events (self time, so nested ops are not counted twice); 'other' the rest."""


def op_class(name: str) -> str:
    return next((label for label, prefixes in CLASSES if name.startswith(prefixes)), "other")


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """GB/s moved by a large tensor copy (read + write), median of `repeats`."""
    src = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every parameter once (a tied embedding counted once, as the lm_head)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def hf_steps(model, ids: torch.Tensor):
    """(first greedy tokens (B,), one decode step: tokens (B,) -> logits (B, V)) of the transformers forward."""
    cache = DynamicCache(config=model.config)
    first = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1)
    return first, lambda token: model(input_ids=token[:, None], past_key_values=cache, use_cache=True).logits[:, -1]


def lean_steps(model, ids: torch.Tensor):
    """The same through the lean path (no adapter context: every row on the base)."""
    lean = LeanLlama(model, ContextHolder(), ids.shape[0])
    return lean.prefill(ids.tolist()).argmax(-1), lean.decode


DECODERS = {"lean": lean_steps, "hf": hf_steps}


def decode_steps(model, decoder: str, batch: int, steps: int, vocab: int, profiled: bool):
    """(per-step seconds, the profiler or None) of `steps` greedy decode steps after a prefill of `batch` rows."""
    ids = torch.randint(3, vocab, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        token, step = DECODERS[decoder](model, ids)
        for _ in range(3):  # warm-up
            token = step(token).argmax(-1)
        times = []
        with (profile(activities=[ProfilerActivity.CPU]) if profiled else contextlib.nullcontext()) as prof:
            for _ in range(steps):
                start = time.perf_counter()
                token = step(token).argmax(-1)
                times.append(time.perf_counter() - start)
    return times, prof


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto")
    ap.add_argument("--decoder", default="lean", choices=tuple(DECODERS))
    args = ap.parse_args()
    dtype = DTYPES[resolve_dtype(args.dtype, "cpu")]
    model = load_base(args.quick, torch.device("cpu"), dtype)
    bandwidth = copy_bandwidth(64 if args.quick else 512)
    # profile a first pass for the op classes, then time a pass without the profiler's overhead
    _, prof = decode_steps(model, args.decoder, args.batch, args.steps, model.config.vocab_size, profiled=True)
    times, _ = decode_steps(model, args.decoder, args.batch, args.steps, model.config.vocab_size, profiled=False)
    step_s = statistics.median(times)
    per_class: dict[str, float] = defaultdict(float)
    others: dict[str, float] = {}
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6 / args.steps
        per_class[op_class(event.key)] += seconds
        if op_class(event.key) == "other":
            others[event.key] = seconds
    profiled = sum(per_class.values())
    nbytes = weight_bytes(model)
    limit_s = nbytes / (bandwidth * 1e9)
    rows = [[label, f"{sec * 1e3:.1f}", f"{sec / profiled:.0%}"] for label, sec in
            sorted(per_class.items(), key=lambda kv: -kv[1])]
    table = markdown_table(["op class", "ms / step (profiled)", "share"], rows)
    linear_s = per_class.get("linear", 0.0) * step_s / profiled
    summary = {
        "dtype": str(dtype).removeprefix("torch."), "decoder": args.decoder, "batch": args.batch, "threads": torch.get_num_threads(),
        "weight_MB": nbytes / 1e6, "copy_bandwidth_GBps": bandwidth, "step_ms": step_s * 1e3,
        "tok_s": args.batch / step_s, "limit_step_ms": limit_s * 1e3, "limit_tok_s": args.batch / limit_s,
        "step_over_limit": step_s / limit_s, "linear_GBps": nbytes / linear_s / 1e9 if linear_s else None,
        "per_class_ms": {k: v * 1e3 for k, v in per_class.items()},
        "top_other_ms": {k: v * 1e3 for k, v in sorted(others.items(), key=lambda kv: -kv[1])[:8]},
    }
    print(table)
    print(f"\n{args.decoder}, {summary['dtype']}, batch {args.batch}, {summary['threads']} threads: step {step_s * 1e3:.1f} ms "
          f"({summary['tok_s']:.0f} tok/s); weights {nbytes / 1e6:.0f} MB at the copy bandwidth {bandwidth:.1f} GB/s "
          f"-> limit {limit_s * 1e3:.1f} ms ({summary['limit_tok_s']:.0f} tok/s); step / limit "
          f"{summary['step_over_limit']:.2f}x; the linears read their weights at "
          f"{summary['linear_GBps'] or float('nan'):.1f} GB/s")
    print("largest 'other' ops (ms / step):", ", ".join(f"{k} {v:.2f}" for k, v in summary["top_other_ms"].items()))
    summary["table"] = table
    name = f"decode_profile_{args.decoder}" + ("_quick" if args.quick else "")
    print(f"wrote {write_json(name, summary)}")


if __name__ == "__main__":
    main()
