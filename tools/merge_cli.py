"""`adalora merge`: merge adapters of one base into one adapter, or into a full model folder (--into-base)."""

from __future__ import annotations

import argparse
from pathlib import Path

from adalora.peft_interop import TASK_TO_PEFT
from adalora.tools.merge import METHODS, MergeError, MergeParams, merge_into_base
from adalora.atomic import remove_stale
from adalora.tools.merge.pipeline import check_output, load_inputs, merge_adapters, merge_files

NAME = "merge"
HELP = "merge adapters: OUT/adapter.safetensors, or with --into-base a full model folder"
USER_ERRORS = (MergeError,)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapters", nargs="+", help="adapter folders or files (native, or PEFT AdaLoRA/LoRA folders)")
    p.add_argument("--weights", nargs="+", type=float, required=True, help="one weight per adapter, e.g. 0.7 0.3")
    p.add_argument("--method", default="linear", help=f"one of {', '.join(METHODS)} (default linear)")
    p.add_argument("--out", required=True, help="output folder (replaced atomically; never an input)")
    p.add_argument("--budget", type=int,
                   help="svd / ties / dare / magnitude: total adapter params of the result (default: svd exact; the "
                        "dense methods the inputs' summed params, or their exact full-rank result with --into-base)")
    p.add_argument("--density", type=float, help="ties / dare / magnitude_prune: fraction of entries kept, (0, 1]")
    p.add_argument("--majority", help="ties / dare_ties sign election: total (default) or frequency")
    p.add_argument("--seed", type=int, help="dare_linear / dare_ties: seed of the random drops; distill: of its "
                   "batches (default 0)")
    p.add_argument("--data", nargs="+", help="distill: one unlabeled data file per adapter, in order (JSONL / CSV rows "
                   "with text; labels are not read); needs --base-model")
    p.add_argument("--steps", type=int, help="distill: optimizer steps of the weights' fit (default 100)")
    p.add_argument("--lambda", dest="lambda_", type=float, metavar="L", help="global multiplier of the merged update (default 1)")
    p.add_argument("--head-from", type=int,
                   help="carry the classification head of input K (1-based); default: no head")
    p.add_argument("--into-base", action="store_true", help="write the base model with the merge added in")
    p.add_argument("--base-model", help="base model folder (safetensors + config + tokenizer): required by --into-base; "
                   "also identifies the base of PEFT inputs not written by adalora (default: the local folder each "
                   "one's base_model_name_or_path names, when that fits)")
    p.add_argument("--task", choices=sorted(TASK_TO_PEFT),
                   help="task type of PEFT inputs, overriding theirs (default: their task_type, else the base's kind)")


def run(args: argparse.Namespace) -> int:
    params = MergeParams(weights=tuple(args.weights), lambda_=args.lambda_, budget=args.budget,
                         density=args.density, majority=args.majority, seed=args.seed,
                         data=tuple(args.data) if args.data else None, steps=args.steps)
    if args.into_base and args.base_model is None:
        raise MergeError("--into-base needs --base-model DIR (the model the merge is added into)")
    if not args.into_base:
        target = merge_files(args.adapters, args.out, args.method, params, head_from=args.head_from,
                             base_model_dir=args.base_model, task_type=args.task)
        print(f"wrote {target}")
        return 0
    check_output(args.out, args.adapters, args.base_model)
    remove_stale(args.out)
    adapters = load_inputs(args.adapters, args.base_model, args.task)
    merged = merge_adapters(adapters, args.method, params, names=list(args.adapters), head_from=args.head_from,
                            base_model_dir=args.base_model)
    out = merge_into_base(merged, Path(args.base_model), Path(args.out))
    print(f"wrote {out} ({merged.num_params()} merged adapter params, ranks summed {sum(merged.ranks().values())})")
    return 0
