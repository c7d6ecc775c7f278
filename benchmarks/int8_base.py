"""Does an int8 base pay here? SmolLM2-135M through the lean decode path with the projections of every layer in
int8, adapters unquantized on top, against the float32 base (the native kernel, engine/native.cpp).

Variants:
- bf16 (ours, `--weights bf16`): a bfloat16 copy of the weights, widened exactly to float32 in engine/native.cpp's
  bf16_linear (what llama.cpp's bf16 GGUF does on a CPU without bfloat16 arithmetic); activations float32;
- int8 block-32 (ours, `--weights int8`): int8 weights with a float32 scale per 32 weights of a row (llama.cpp's
  q8_0 scales), activations float32, through engine/native.cpp's int8_linear; the LM head too;
- int8 weight-only per channel (the QLoRA-style row in PyTorch): weights int8 per output channel, activations float32, through PyTorch's
  CPU kernel for it (aten._weight_int8pack_mm; torchao's Int8WeightOnlyConfig is timed beside it in the kernel
  table when torchao is installed);
- int8 dynamic (W8A8): the same weights, each activation tensor quantized to 8 bits on the fly, through fbgemm
  (torch.ops.quantized.linear_dynamic) -- what llama.cpp's q8_0 does, but per tensor, not per block of 32.

Reported: one batch-B decode step (median of --steps), greedy agreement with float32 (the share of generated tokens
equal to float32's up to each row's first difference, B prompts x --new-tokens), perplexity over the packaged
movie-dialog eval lines; and the kernels alone at decode shapes.

    OMP_NUM_THREADS=2 python benchmarks/int8_base.py [--batch 8] [--steps 10] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from _common import markdown_table, write_json  # noqa: E402
from adalora.assets import dataset_path, model_path  # noqa: E402
from adalora.engine.lean import Dense, LeanLlama  # noqa: E402
from adalora.engine.multi_linear import ContextHolder  # noqa: E402

warnings.filterwarnings("ignore", message=".*quantize_per_channel.*")  # PyTorch points such users to torchao
SHAPES = ((576, 960), (576, 3072), (1536, 576))
"""(in, out) of SmolLM2's fused q/k/v, fused gate/up, and down projections."""


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight (out, in), float32 scale (out,)): symmetric per output channel."""
    scale = weight.abs().amax(1).clamp(min=1e-12) / 127
    return (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


class WeightOnly:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.q, self.scale = int8_rows(weight)
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.q, self.scale)
        return y if self.bias is None else y + self.bias


class Dynamic:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        q, scale = int8_rows(weight)
        qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
        self.packed = torch.ops.quantized.linear_prepack(qweight, bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.contiguous(), self.packed, True)


VARIANTS = {"float32 (native)": None, "bf16 (native, --weights bf16)": "bf16",
            "int8 block-32 (native, --weights int8)": "int8",
            "int8 weight-only per channel (PyTorch)": WeightOnly, "int8 dynamic (W8A8, fbgemm)": Dynamic}
"""Layer weights compared: a str is a lean path `weights` option (engine.lean.WEIGHTS), a class wraps each Dense."""


def lean_with(model, variant, rows: int) -> LeanLlama:
    if isinstance(variant, str):
        return LeanLlama(model, ContextHolder(), rows, variant)
    lean = LeanLlama(model, ContextHolder(), rows)
    if variant is not None:
        for layer in lean.layers:
            for projection in (layer.qkv, layer.o, layer.gate_up, layer.down):
                projection.dense = variant(projection.dense.weight, projection.dense.bias)
    return lean


def decode_ms(lean: LeanLlama, batch: int, steps: int, vocab: int) -> float:
    ids = torch.randint(3, vocab, (batch, 32), generator=torch.Generator().manual_seed(0))
    lean.clear()
    token = lean.prefill(ids.tolist()).argmax(-1)
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        token = lean.decode(token).argmax(-1)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1e3


def greedy(lean: LeanLlama, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    lean.clear()
    out = [[] for _ in prompts]
    token = lean.prefill(prompts).argmax(-1)
    for _ in range(new_tokens):
        for row, t in zip(out, token.tolist()):
            row.append(t)
        token = lean.decode(token).argmax(-1)
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = sum(next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x)) for x, y in zip(a, b))
    return same / sum(map(len, a))


def perplexity(lean: LeanLlama, texts: list[list[int]]) -> float:
    """Over every next-token prediction of each text, one text per forward (through the lean forward's layers)."""
    nll = count = 0.0
    for ids in texts:
        lean.clear()
        hidden, _ = lean.prefill_hidden([ids])  # (P, hidden)
        logits = lean.logits(hidden)  # (P, V)
        nll += F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()
        count += len(ids) - 1
    lean.clear()
    return math.exp(nll / count)


def timed(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def kernels(batch: int) -> tuple[list[str], list[list[str]]]:
    """ms per call of each kernel at each shape."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        quantize_ = None
    headers = ["in x out", *VARIANTS, *(["torchao Int8WeightOnlyConfig"] if quantize_ else [])]
    rows = []
    for in_f, out_f in SHAPES:
        weight, x = torch.randn(out_f, in_f) * 0.05, torch.randn(batch, in_f)
        row = [f"{in_f}x{out_f}"]
        for variant in VARIANTS.values():
            kernel = Dense(weight, None, variant) if isinstance(variant, str) else (variant or Dense)(weight, None)
            row.append(f"{timed(lambda: kernel(x), 5 if variant is WeightOnly else 20):.2f}")
        if quantize_:
            linear = torch.nn.Linear(in_f, out_f, bias=False)
            quantize_(linear, Int8WeightOnlyConfig())
            row.append(f"{timed(lambda: linear(x), 5):.2f}")
        rows.append(row)
    return headers, rows


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--texts", type=int, default=48, help="eval lines the perplexity reads")
    args = ap.parse_args()
    folder = model_path("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    lines = [json.loads(line) for line in dataset_path("moviedialog", "eval").read_text().splitlines()[: args.texts]]
    texts = [tokenizer(r["prompt"] + r["completion"])["input_ids"] for r in lines]
    prompts = [tokenizer(r["prompt"])["input_ids"] for r in lines[: args.batch]]
    reference, rows, summary = None, [], {}
    for name, variant in VARIANTS.items():
        lean = lean_with(model, variant, args.batch)
        step = decode_ms(lean, args.batch, args.steps, model.config.vocab_size)
        tokens = greedy(lean, prompts, args.new_tokens)
        reference = reference or tokens
        summary[name] = {"decode_step_ms": step, "greedy_agreement": agreement(tokens, reference),
                         "perplexity": perplexity(lean, texts)}
        s = summary[name]
        rows.append([name, f"{step:.1f}", f"{args.batch / step * 1e3:.0f}", f"{s['greedy_agreement']:.0%}",
                     f"{s['perplexity']:.2f}"])
    table = markdown_table(["layers' weights", "decode step ms (lean)", "tok/s", "greedy = float32", "perplexity"],
                           rows)
    headers, kernel_rows = kernels(args.batch)
    kernel_table = markdown_table(headers, kernel_rows)
    print(table, "\n\nms per call, batch", args.batch, "\n" + kernel_table)
    summary.update(batch=args.batch, threads=torch.get_num_threads(), table=table, kernels=kernel_table)
    print(f"wrote {write_json('int8_base', summary)}")


if __name__ == "__main__":
    main()
