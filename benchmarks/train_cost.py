"""Training cost of AdaLoRA (ours) vs LoRA (ours) vs PEFT AdaLoRA: seconds per step and peak memory, as ratios.

Time: the three models live in one process and are stepped side by side; each repeat runs --steps steps
of every method in a rotated order, warm-up steps are discarded, and the median over repeats is
reported. Memory: each method trains in a fresh subprocess that reports its peak RSS (CPU) or
torch.cuda.max_memory_allocated (GPU).

    python benchmarks/train_cost.py --quick     # tiny random BERT, seconds
    python benchmarks/train_cost.py             # MiniLM-L6 on TREC-6 batches (prepared by `adalora prepare`)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import markdown_table, median, quick_assets, write_json  # noqa: E402
from adalora import assets  # noqa: E402
from adalora import data as data_mod  # noqa: E402
from adalora.allocator import RankAllocator  # noqa: E402
from adalora.config import AdaLoraConfig, schedule_from_fractions  # noqa: E402
from adalora.inject import DEFAULT_TARGETS, inject_adapters  # noqa: E402
from adalora.recipe import TrainSpec, load_base, resolve_device  # noqa: E402
from adalora.regularizer import orth_penalty  # noqa: E402
from adalora.training import TrainArgs, make_optimizer, make_scheduler, seed_everything  # noqa: E402

METHODS = ("adalora", "lora", "peft-adalora")
INIT_R, TARGET_R, LORA_R = 3, 2, 2


def make_stepper(method: str, model_dir: str, data_path: str, args: argparse.Namespace
                 ) -> Callable[[int], None]:
    """A closure running one full optimizer step of `method` (forward, backward, optimizer, allocator)."""
    examples = data_mod.load_examples(data_path, "seq-cls")
    labels = data_mod.label_set(examples)
    spec = TrainSpec(base_model=model_dir, task="seq-cls", data=data_path, out=tempfile.gettempdir(), total_steps=1,
                     device=args.device)
    seed_everything(0)
    model, tokenizer = load_base(spec, labels)
    device = resolve_device(args.device)
    model.to(device)
    batches = data_mod.make_batches(examples, tokenizer, "seq-cls", args.batch_size, 0, args.max_length, labels)
    total = args.total_step
    train_args = TrainArgs(total_steps=total, lr=1e-3)
    if method == "peft-adalora":
        return _peft_stepper(model, batches, total, train_args, device)
    if method == "lora":
        config = AdaLoraConfig(mode="lora", init_r=LORA_R, total_step=total)
    else:
        config = AdaLoraConfig(init_r=INIT_R, target_r=TARGET_R, total_step=total, **schedule_from_fractions(total))
    adapters = inject_adapters(model, config, task_type="seq-cls", labels=labels)
    allocator = RankAllocator(adapters) if config.mode == "adalora" else None
    opt = make_optimizer(adapters, train_args)
    sched = make_scheduler(opt, train_args)
    params = adapters.trainable_parameters()
    gamma = config.orth_reg_weight if allocator is not None else 0.0
    model.train()

    def step(i: int) -> None:  # the body of adalora.training.train
        batch = {k: v.to(device) for k, v in batches(i).items()}
        loss = model(**batch).loss
        reg = orth_penalty(adapters) if gamma > 0 else torch.zeros((), device=device)
        (loss.float() + gamma * reg).backward()
        torch.nn.utils.clip_grad_norm_(params, train_args.grad_clip)
        opt.step()
        sched.step()
        if allocator is not None:
            allocator.step(i)
        opt.zero_grad(set_to_none=True)

    return step


def _peft_stepper(model, batches, total: int, train_args: TrainArgs, device) -> Callable[[int], None]:
    from peft import AdaLoraConfig as PeftAdaLoraConfig, get_peft_model

    config = PeftAdaLoraConfig(task_type="SEQ_CLS", init_r=INIT_R, target_r=TARGET_R, lora_alpha=8.0, lora_dropout=0.0,
                               target_modules=list(DEFAULT_TARGETS[model.config.model_type]), total_step=total,
                               **schedule_from_fractions(total))
    model = get_peft_model(model, config).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train_args.lr, weight_decay=0.0)
    sched = make_scheduler(opt, train_args)
    model.train()

    def step(i: int) -> None:
        batch = {k: v.to(device) for k, v in batches(i).items()}
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train_args.grad_clip)
        opt.step()
        sched.step()
        model.base_model.update_and_allocate(i)
        opt.zero_grad(set_to_none=True)

    return step


def _sync(device: str) -> None:
    if torch.cuda.is_available() and device != "cpu":
        torch.cuda.synchronize()


def time_side_by_side(steppers: dict[str, Callable[[int], None]], args: argparse.Namespace) -> dict[str, dict]:
    counters = {m: 0 for m in steppers}
    for m, step in steppers.items():  # warm-up, discarded
        for _ in range(args.warmup):
            step(counters[m])
            counters[m] += 1
    per_repeat: dict[str, list[float]] = {m: [] for m in steppers}
    order = list(steppers)
    for r in range(args.repeats):
        rotated = order[r % len(order):] + order[:r % len(order)]
        for m in rotated:
            _sync(args.device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steppers[m](counters[m])
                counters[m] += 1
            _sync(args.device)
            per_repeat[m].append((time.perf_counter() - t0) / args.steps)
    return {m: {"median_s_per_step": median(v), "repeats": v} for m, v in per_repeat.items()}


def peak_memory_child(args: argparse.Namespace) -> dict:
    """Runs in a fresh process: train one method for warmup + steps, report its peak memory."""
    step = make_stepper(args.child, args.model, args.data, args)
    for i in range(args.warmup + args.steps):
        step(i)
    if torch.cuda.is_available() and args.device != "cpu":
        return {"peak_bytes": torch.cuda.max_memory_allocated(), "kind": "cuda max_memory_allocated"}
    return {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "kind": "peak RSS"}


def measure_memory(method: str, model_dir: str, data_path: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--model", model_dir, "--data", data_path,
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--total-step", str(args.total_step), "--device", args.device]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child for {method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny random BERT + synthetic data (seconds)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--warmup", type=int, default=5, help="steps per method discarded before timing")
    p.add_argument("--steps", type=int, default=10, help="timed steps per method per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--total-step", type=int, default=200, help="schedule length the allocators are built for")
    p.add_argument("--device", default="auto")
    p.add_argument("--cache", default=None)
    p.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    p.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(peak_memory_child(args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="adalora-cost-") as tmp:
        if args.quick:
            torch.set_num_threads(1)  # tiny matmuls: extra threads only add contention
            args.warmup, args.steps, args.repeats, args.total_step = 2, 3, 3, 40
            quick = quick_assets(Path(tmp) / "quick")
            model_dir, data_path = quick["bert"], quick["seq-cls"]["train"]
        else:
            model_dir = str(assets.model_path("minilm-l6", args.cache))
            data_path = str(assets.dataset_path("trec6", "train", args.cache))
        args.total_step = max(args.total_step, args.warmup + args.steps * args.repeats + 1)
        steppers = {m: make_stepper(m, model_dir, data_path, args) for m in args.methods}
        timing = time_side_by_side(steppers, args)
        del steppers
        memory = {} if args.no_memory else {m: measure_memory(m, model_dir, data_path, args) for m in args.methods}
    ref = "lora" if "lora" in args.methods else args.methods[0]
    rows = []
    for m in args.methods:
        t = timing[m]["median_s_per_step"]
        row = [m, f"{1000 * t:.1f}", f"{t / timing[ref]['median_s_per_step']:.2f}x"]
        if memory:
            row += [f"{memory[m]['peak_bytes'] / 2**20:.0f}", f"{memory[m]['peak_bytes'] / memory[ref]['peak_bytes']:.2f}x"]
        rows.append(row)
    headers = ["method", "ms/step (median)", f"time vs {ref}"]
    if memory:
        headers += [f"peak MiB ({next(iter(memory.values()))['kind']})", f"memory vs {ref}"]
    table = markdown_table(headers, rows)
    print(table)
    name = "train_cost_quick" if args.quick else "train_cost"
    path = write_json(name, {"args": vars(args), "timing": timing, "memory": memory, "reference": ref, "table": table})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
