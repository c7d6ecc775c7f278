"""Accuracy of AdaLoRA (ours) vs LoRA (ours, same code path) vs PEFT AdaLoRA at an equal final budget.

MiniLM-L6 sequence classification on trec6, sms-spam and rt-sentiment (prepared by `adalora prepare`).
Budget: every linear map of each block (6 per layer); LoRA keeps r=2 everywhere. Our AdaLoRA starts at
init_r=3 and prunes to a parameter budget equal to LoRA's parameter count (--adalora-budget params, the
default: "equal final parameter budget"; the budget flows freely between cheap attention maps and wide
FFN maps) or to target_r=2 triplets per module (--adalora-budget rank). PEFT's AdaLoRA has only the
triplet budget (target_r=2), so it ends below LoRA's count.
Each method gets its best lr from a grid on seed 0, then runs --seeds seeds at that lr.

    python benchmarks/train_quality.py --quick          # tiny random model, seconds (CI)
    python benchmarks/train_quality.py                  # full run (slow: leave it to a quiet machine)
    python benchmarks/train_quality.py --datasets trec6 --methods adalora --lrs 1e-3 --seeds 1 --max-train 500
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import fmt_mean_std, markdown_table, mean_std, quick_assets, write_json  # noqa: E402
from adalora import assets  # noqa: E402
from adalora import data as data_mod  # noqa: E402
from adalora.config import DEFAULT_LAMBDA_LR_SCALE, AdapterShape, schedule_from_fractions  # noqa: E402
from adalora.inject import DEFAULT_TARGETS  # noqa: E402
from adalora.recipe import TrainSpec, load_base, resolve_device, run_train  # noqa: E402
from adalora.training import TrainArgs, make_scheduler, seed_everything, steps_for_epochs  # noqa: E402

DATASETS = ("trec6", "sms-spam", "rt-sentiment")
METHODS = ("adalora", "lora", "peft-adalora")
INIT_R, TARGET_R, LORA_R = 3, 2, 2


def dataset_files(name: str, cache: str | None, max_train: int | None, tmp: Path) -> tuple[str, str]:
    """(train, eval) paths; with max_train the first N training rows (already shuffled) go to a temp file."""
    train, eval_path = assets.dataset_path(name, "train", cache), assets.dataset_path(name, "eval", cache)
    if max_train is None:
        return str(train), str(eval_path)
    capped = tmp / f"{name}-train-{max_train}.jsonl"
    capped.write_text("".join(train.read_text().splitlines(keepends=True)[:max_train]))
    return str(capped), str(eval_path)


def lora_params(model: str) -> int:
    """Parameters of LoRA at r=LORA_R on the default targets of `model`: LORA_R * (in + out) per module."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from adalora.inject import resolve_targets
    from adalora.layers import linear_dims

    with torch.device("meta"):
        net = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(model))
    return sum(LORA_R * sum(linear_dims(net.get_submodule(p))) for p in resolve_targets(net, ()))


def spec_for(method: str, model: str, train: str, eval_path: str, out: str, lr: float, seed: int,
             args: argparse.Namespace) -> TrainSpec:
    if method == "lora":
        budget = dict(mode="lora", init_r=LORA_R)
    elif args.adalora_budget == "params" and method == "adalora":
        budget = dict(mode="adalora", init_r=INIT_R, budget=lora_params(model))
    else:
        budget = dict(mode="adalora", init_r=INIT_R, target_r=TARGET_R)
    return TrainSpec(base_model=model, task="seq-cls", data=train, eval_data=eval_path, out=out, epochs=args.epochs,
                     lr=lr, seed=seed, batch_size=args.batch_size, max_length=args.max_length, device=args.device,
                     progress=False, adapter=AdapterShape(init=args.init, lambda_lr_scale=args.lambda_lr_scale,
                                                          lora_alpha=args.lora_alpha, **budget))


def run_ours(spec: TrainSpec) -> dict:
    report = run_train(spec)
    return {"accuracy": report["eval"]["accuracy"], "adapter_params": report["adapter_params"],
            "steps": report["steps"], "seconds": report["seconds"], "out": spec.out}


def peft_kept_params(model: torch.nn.Module) -> int:
    """Final adapter parameters of a PEFT AdaLoRA model: kept (nonzero lam) triplets x (in + out + 1)."""
    from peft.tuners.adalora import AdaLoraLayer

    total = 0
    for module in model.modules():
        if isinstance(module, AdaLoraLayer) and "default" in module.lora_E:
            out_f, _ = module.lora_B["default"].shape
            _, in_f = module.lora_A["default"].shape
            total += int((module.lora_E["default"] != 0).sum()) * (in_f + out_f + 1)
    return total


def run_peft(spec: TrainSpec) -> dict:
    """PEFT AdaLoRA with our batches, optimizer, lr schedule, clipping and evaluation."""
    from peft import AdaLoraConfig, get_peft_model

    train_ex = data_mod.load_examples(spec.data, spec.task)
    eval_ex = data_mod.load_examples(spec.eval_data, spec.task)
    labels = data_mod.label_set(train_ex)
    total = steps_for_epochs(len(train_ex), spec.batch_size, spec.epochs)
    seed_everything(spec.seed)
    model, tokenizer = load_base(spec, labels)
    model_type = model.config.model_type
    config = AdaLoraConfig(task_type="SEQ_CLS", init_r=spec.adapter.init_r, target_r=spec.adapter.target_r,
                           lora_alpha=spec.adapter.lora_alpha,
                           lora_dropout=0.0, target_modules=list(DEFAULT_TARGETS[model_type]), total_step=total,
                           beta1=spec.adapter.beta1, beta2=spec.adapter.beta2,
                           orth_reg_weight=spec.adapter.orth_reg_weight,
                           **schedule_from_fractions(total))
    model = get_peft_model(model, config).to(resolve_device(spec.device))
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    train_args = TrainArgs(total_steps=total, lr=spec.lr, seed=spec.seed)
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    sched = make_scheduler(opt, train_args)
    batches = data_mod.make_batches(train_ex, tokenizer, spec.task, spec.batch_size, spec.seed, spec.max_length, labels)
    model.train()
    t0 = time.perf_counter()
    for step in range(total):
        batch = {k: v.to(device) for k, v in batches(step).items()}
        model(**batch).loss.backward()  # PEFT adds orth_reg_weight * its regularizer to .loss
        torch.nn.utils.clip_grad_norm_(params, train_args.grad_clip)
        opt.step()
        sched.step()
        model.base_model.update_and_allocate(step)  # after the optimizer step, before zero_grad
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    metrics = data_mod.evaluate(model, eval_ex, tokenizer, spec.task, labels, max_length=spec.max_length)
    return {"accuracy": metrics["accuracy"], "adapter_params": peft_kept_params(model), "steps": total,
            "seconds": seconds}


def run_one(method: str, spec: TrainSpec) -> dict:
    result = run_peft(spec) if method == "peft-adalora" else run_ours(spec)
    print(f"  {method:13s} lr={spec.lr:g} seed={spec.seed}: acc={result['accuracy']:.4f} "
          f"params={result['adapter_params']} ({result['seconds']:.0f} s)", flush=True)
    return result


def bench_dataset(name: str, model: str, train: str, eval_path: str, args: argparse.Namespace, tmp: Path) -> dict:
    out: dict[str, dict] = {}
    counter = iter(range(10**9))

    def fresh_out() -> str:
        return str(tmp / f"run-{next(counter)}")

    for method in args.methods:
        grid = {lr: run_one(method, spec_for(method, model, train, eval_path, fresh_out(), lr, 0, args)) for lr in args.lrs}
        best_lr = max(grid, key=lambda lr: grid[lr]["accuracy"])
        runs = [grid[best_lr]] + [run_one(method, spec_for(method, model, train, eval_path, fresh_out(), best_lr, s, args))
                                  for s in range(1, args.seeds)]
        accs = [r["accuracy"] for r in runs]
        if args.keep_adapters and method == "adalora":
            keep = Path(args.keep_adapters) / name
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(grid[best_lr]["out"], keep)
        out[method] = {"best_lr": best_lr, "lr_grid_seed0": {str(lr): r["accuracy"] for lr, r in grid.items()},
                       "accuracies": accs, "mean": mean_std(accs)[0], "std": mean_std(accs)[1],
                       "adapter_params": runs[0]["adapter_params"], "steps": runs[0]["steps"]}
    return out


def print_results(results: dict, methods: list[str]) -> str:
    headers = ["dataset"] + [f"{m} (acc %)" for m in methods]
    rows = [[name] + [fmt_mean_std(res[m]["accuracies"]) for m in methods] for name, res in results.items()]
    rows.append(["average"] + [f"{100 * sum(res[m]['mean'] for res in results.values()) / len(results):.1f}"
                               for m in methods])
    rows.append(["params (first)"] + [str(next(iter(results.values()))[m]["adapter_params"]) for m in methods])
    rows.append(["best lr (first)"] + [f"{next(iter(results.values()))[m]['best_lr']:g}" for m in methods])
    table = markdown_table(headers, rows)
    print(table)
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny random BERT + synthetic data (seconds)")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, default=3, help="seeds per method at its best lr (seed 0 picks the lr)")
    p.add_argument("--lrs", nargs="+", type=float, default=[5e-4, 1e-3, 3e-3], help="lr grid searched on seed 0")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--max-train", type=int, default=None, help="use only the first N training rows")
    p.add_argument("--lora-alpha", type=float, default=8.0)
    p.add_argument("--adalora-budget", choices=("params", "rank"), default="params",
                   help="our AdaLoRA's final budget: LoRA's parameter count, or target_r triplets per module")
    p.add_argument("--init", choices=("orthogonal", "peft"), default="orthogonal", help="ablation: our P/Q init")
    p.add_argument("--lambda-lr-scale", type=float, default=DEFAULT_LAMBDA_LR_SCALE,
                   help=f"ablation: lr multiplier of our lam (default {DEFAULT_LAMBDA_LR_SCALE:g}, the product default)")
    p.add_argument("--keep-adapters", default=None,
                   help="copy each dataset's AdaLoRA adapter (seed 0, best lr) to DIR/<dataset> (for merge_quality)")
    p.add_argument("--device", default="auto")
    p.add_argument("--cache", default=None, help="asset cache (default $ADALORA_CACHE or ~/.cache/adalora)")
    p.add_argument("--name", default=None, help="results file name (default train_quality[_quick])")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="adalora-quality-") as tmp_name:
        tmp = Path(tmp_name)
        results = {}
        if args.quick:
            torch.set_num_threads(1)  # tiny matmuls: extra threads only add contention
            args.epochs, args.lrs, args.seeds = 1.0, [3e-3], min(args.seeds, 2)
            quick = quick_assets(tmp / "quick")
            print("dataset synthetic (quick)", flush=True)
            results["synthetic"] = bench_dataset("synthetic", quick["bert"], quick["seq-cls"]["train"],
                                                 quick["seq-cls"]["eval"], args, tmp)
        else:
            model = str(assets.model_path("minilm-l6", args.cache))
            for name in args.datasets:
                print(f"dataset {name}", flush=True)
                train, eval_path = dataset_files(name, args.cache, args.max_train, tmp)
                results[name] = bench_dataset(name, model, train, eval_path, args, tmp)
    table = print_results(results, args.methods)
    name = args.name or ("train_quality_quick" if args.quick else "train_quality")
    path = write_json(name, {"args": vars(args), "budget": {"init_r": INIT_R, "target_r": TARGET_R, "lora_r": LORA_R,
                                                        "adalora_budget": args.adalora_budget},
                             "results": results, "table": table})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
