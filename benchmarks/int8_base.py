"""Does an int8 weight-only base pay here? SmolLM2-135M with torchao's Int8WeightOnlyConfig (the QLoRA-style row:
base weights int8 per output channel, activations and adapters in float) against the float32 and bfloat16 bases.

Speed: one batch-B decode step of the transformers forward (medians over --steps), and the three matmul kernels
behind it at decode shapes (float32 through oneDNN, as the lean path runs it; the int8 weight-only kernel that
torchao calls on a CPU, aten._weight_int8pack_mm). Quality: greedy agreement with float32 (the share of
generated tokens equal to float32's, up to each row's first difference) and perplexity on the packaged
movie-dialog eval lines.

    pip install torchao==0.18.0     # not a dependency of the project
    OMP_NUM_THREADS=2 python benchmarks/int8_base.py [--batch 8] [--steps 10] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402

from _common import markdown_table, write_json  # noqa: E402
from adalora.assets import dataset_path, model_path  # noqa: E402

SHAPES = ((576, 960), (576, 3072), (1536, 576), (576, 49152))
"""(in, out) of SmolLM2's fused q/k/v, fused gate/up, down and LM head."""


def timed(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def kernels(batch: int) -> list[list[str]]:
    """ms per call of each kernel at each shape."""
    rows = []
    for in_f, out_f in SHAPES:
        W, x = torch.randn(out_f, in_f), torch.randn(batch, in_f)
        scale = W.abs().amax(1) / 127
        Wq = (W / scale[:, None]).round().to(torch.int8)
        packed = torch.ops.mkldnn._reorder_linear_weight(W, None)
        fp32 = timed(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
        plain = timed(lambda: F.linear(x, W))
        int8 = timed(lambda: torch.ops.aten._weight_int8pack_mm(x, Wq, scale), repeats=5)
        rows.append([f"{in_f}x{out_f}", f"{plain * 1e3:.2f}", f"{fp32 * 1e3:.2f}", f"{int8 * 1e3:.2f}",
                     f"{int8 / fp32:.1f}x"])
    return rows


def decode_ms(model, batch: int, steps: int) -> float:
    ids = torch.randint(3, model.config.vocab_size, (batch, 32), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        token = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def greedy(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            gen = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            out.append(gen[0, len(prompt):].tolist())
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of tokens equal up to each row's first difference (what a user sees match)."""
    same = total = 0
    for x, y in zip(a, b):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        same, total = same + n, total + len(x)
    return same / total


def perplexity(model, texts: list[list[int]]) -> float:
    nll = count = 0.0
    with torch.no_grad():
        for ids in texts:
            t = torch.tensor([ids])
            logits = model(input_ids=t).logits.float()
            nll += F.cross_entropy(logits[0, :-1], t[0, 1:], reduction="sum").item()
            count += len(ids) - 1
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        print("skipped: torchao is not installed (pip install torchao==0.18.0)")
        return
    folder = model_path("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    int8 = copy.deepcopy(base)
    quantize_(int8, Int8WeightOnlyConfig())
    models = {"float32": base, "bfloat16": copy.deepcopy(base).to(torch.bfloat16), "int8 weight-only": int8}
    lines = [json.loads(line) for line in dataset_path("moviedialog", "eval").read_text().splitlines()[:64]]
    texts = [tokenizer(r["prompt"] + r["completion"])["input_ids"] for r in lines]
    prompts = [tokenizer(r["prompt"])["input_ids"] for r in lines[: args.batch]]
    reference = greedy(base, prompts, args.new_tokens)
    rows, summary = [], {}
    for name, model in models.items():
        step = decode_ms(model, args.batch, args.steps)
        agree = agreement(greedy(model, prompts, args.new_tokens), reference)
        ppl = perplexity(model, texts)
        summary[name] = {"decode_step_ms": step, "greedy_agreement": agree, "perplexity": ppl}
        rows.append([name, f"{step:.1f}", f"{args.batch / step * 1e3:.0f}", f"{agree:.0%}", f"{ppl:.2f}"])
    table = markdown_table(["base weights", "decode step ms (hf forward)", "tok/s", "greedy = float32",
                            "perplexity"], rows)
    kernel_table = markdown_table(["in x out", "F.linear fp32 ms", "oneDNN fp32 ms", "int8 weight-only ms",
                                   "int8 / oneDNN"], kernels(args.batch))
    print(table)
    print()
    print(kernel_table)
    summary.update(batch=args.batch, threads=torch.get_num_threads(), table=table, kernels=kernel_table)
    print(f"wrote {write_json('int8_base', summary)}")


if __name__ == "__main__":
    main()
