"""`adalora train`: train an AdaLoRA (or LoRA) adapter on a local base model and write a compact adapter."""

from __future__ import annotations

import argparse

from adalora.collapse import DEFAULT_LR
from adalora.config import DEFAULT_LAMBDA_LR_SCALE, AdapterShape
from adalora.data import DataError
from adalora.recipe import REPORT_NAME, SpecError, TrainSpec, print_summary, run_train
from adalora.training import TrainingError

NAME = "train"
HELP = "train an adapter: writes OUT/adapter.safetensors, OUT/report.json and OUT/ranks.png"
USER_ERRORS = (DataError, TrainingError, SpecError)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter  # --help shows every default
    p.add_argument("--base-model", required=True, help="local model folder (config, weights, tokenizer)")
    p.add_argument("--task", required=True, choices=("seq-cls", "causal-lm"), help="what the adapter learns")
    p.add_argument("--data", required=True, help=".jsonl or .csv: text,label (seq-cls); text or prompt,completion")
    p.add_argument("--eval-data", help="held-out data in the same format; evaluated at the end")
    p.add_argument("--out", required=True, help="output folder (must be new or empty unless --resume)")
    p.add_argument("--target-modules", nargs="+", default=(), help="module name suffixes (empty: per architecture)")
    p.add_argument("--mode", choices=("adalora", "lora"), default="adalora",
                   help="adalora: SVD-form adapter pruned to a budget; lora: plain LoRA at --init-r")
    p.add_argument("--init-r", type=int, default=12, help="starting rank of every module")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--target-r", type=float,
                        help="average kept rank per module (adalora; None: init_r * 2/3 unless --budget)")
    budget.add_argument("--budget", type=int, help="total kept adapter parameters (adalora)")
    steps = p.add_mutually_exclusive_group(required=True)
    steps.add_argument("--total-steps", type=int, help="optimizer steps")
    steps.add_argument("--epochs", type=float, help="passes over --data")
    p.add_argument("--tinit", type=int, help="steps before pruning starts (None: 10%% of the run)")
    p.add_argument("--tfinal", type=int, help="final steps at the frozen target mask (None: 20%%)")
    p.add_argument("--deltaT", type=int, help="re-mask interval (None: about 50 re-masks)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (None: the mode's, adalora {DEFAULT_LR['adalora']:g}, lora "
                        f"{DEFAULT_LR['lora']:g}: the best of each on docs/BENCHMARKS.md's grid; AdaLoRA at 1e-3 "
                        f"collapses there)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per step, per process")
    p.add_argument("--seed", type=int, default=0, help="random seed (initialization, data order)")
    p.add_argument("--lora-alpha", type=float, default=8.0, help="scale numerator: the delta is scaled by alpha / r")
    p.add_argument("--orth-reg-weight", type=float, default=0.5, help="weight of the orthogonality regularizer")
    p.add_argument("--init", choices=("orthogonal", "peft"), default="orthogonal", help="factor initialization")
    p.add_argument("--lambda-lr-scale", type=float, default=DEFAULT_LAMBDA_LR_SCALE,
                   help="lr multiplier for lambda (1 = PEFT's single lr)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example (longer ones are cut)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear lr warmup steps")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="base weights (adapters train in float32)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (needs --eval-data; 0: at the end)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="write OUT/checkpoint.pt every N steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def spec_from_args(args: argparse.Namespace) -> TrainSpec:
    return TrainSpec(
        base_model=args.base_model, task=args.task, data=args.data, out=args.out, eval_data=args.eval_data,
        adapter=AdapterShape(mode=args.mode, init_r=args.init_r, target_r=args.target_r, budget=args.budget,
                             lora_alpha=args.lora_alpha, target_modules=tuple(args.target_modules),
                             orth_reg_weight=args.orth_reg_weight, init=args.init,
                             lambda_lr_scale=args.lambda_lr_scale),
        total_steps=args.total_steps, epochs=args.epochs,
        tinit=args.tinit, tfinal=args.tfinal, deltaT=args.deltaT, lr=args.lr, batch_size=args.batch_size,
        seed=args.seed, max_length=args.max_length, warmup_steps=args.warmup_steps, device=args.device,
        eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, resume=args.resume,
        progress=not args.no_progress, dtype=args.dtype,
    )


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    report = run_train(spec)
    if report.get("adapter_file"):
        print_summary(report)
        print(f"report: {args.out}/{REPORT_NAME}")
    return 0
