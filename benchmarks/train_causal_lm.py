"""SmolLM2-135M on movie-dialog replies: held-out perplexity before and after, AdaLoRA vs LoRA at equal budget.

LoRA keeps r=4 on q_proj and v_proj of every layer; AdaLoRA starts at init_r=6 and prunes to target_r=4
(the same number of final triplets). A short run: --steps optimizer steps at batch 8.

    python benchmarks/train_causal_lm.py --quick     # tiny random Llama + synthetic pairs, seconds
    python benchmarks/train_causal_lm.py             # real model and data (prepared by `adalora prepare`)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import markdown_table, quick_assets, write_json  # noqa: E402
from adalora import assets  # noqa: E402
from adalora import data as data_mod  # noqa: E402
from adalora.config import AdapterShape  # noqa: E402
from adalora.recipe import TrainSpec, load_base, resolve_device, run_train  # noqa: E402

METHODS = ("adalora", "lora")
INIT_R, TARGET_R, LORA_R = 6, 4, 4


def base_perplexity(spec: TrainSpec) -> dict:
    model, tokenizer = load_base(spec, None)
    model.to(resolve_device(spec.device))
    examples = data_mod.load_examples(spec.eval_data, spec.task)
    return data_mod.evaluate(model, examples, tokenizer, spec.task, batch_size=16, max_length=spec.max_length)


def spec_for(method: str, model: str, train: str, eval_path: str, out: str, args: argparse.Namespace) -> TrainSpec:
    budget = dict(mode="lora", init_r=LORA_R) if method == "lora" else dict(mode="adalora", init_r=INIT_R, target_r=TARGET_R)
    return TrainSpec(base_model=model, task="causal-lm", data=train, eval_data=eval_path, out=out,
                     total_steps=args.steps, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                     seed=args.seed, device=args.device, progress=False,
                     adapter=AdapterShape(target_modules=tuple(args.target_modules), lora_alpha=args.lora_alpha, **budget))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny random Llama + synthetic pairs (seconds)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--dataset", default="moviedialog", choices=[n for n, s in assets.DATASETS.items() if s.task == "causal-lm"])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lora-alpha", type=float, default=8.0)
    p.add_argument("--target-modules", nargs="+", default=["q_proj", "v_proj"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--cache", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="adalora-clm-") as tmp:
        if args.quick:
            torch.set_num_threads(1)  # tiny matmuls: extra threads only add contention
            args.steps = 20
            quick = quick_assets(Path(tmp) / "quick")
            model, train, eval_path = quick["llama"], quick["causal-lm"]["train"], quick["causal-lm"]["eval"]
        else:
            model = str(assets.model_path("smollm2-135m", args.cache))
            train = str(assets.dataset_path(args.dataset, "train", args.cache))
            eval_path = str(assets.dataset_path(args.dataset, "eval", args.cache))
        before = base_perplexity(spec_for("lora", model, train, eval_path, f"{tmp}/base", args))
        print(f"base: eval perplexity {before['perplexity']:.2f}", flush=True)
        for method in args.methods:
            report = run_train(spec_for(method, model, train, eval_path, f"{tmp}/{method}", args))
            results[method] = {"perplexity": report["eval"]["perplexity"], "loss": report["eval"]["loss"],
                               "adapter_params": report["adapter_params"], "ranks_table": report["ranks_table"],
                               "final_train_loss": report["final_loss"], "seconds": report["seconds"],
                               "seconds_per_step": report["seconds_per_step"]}
            print(f"{method}: eval perplexity {results[method]['perplexity']:.2f} ({report['seconds']:.0f} s)", flush=True)
    rows = [["base (no adapter)", f"{before['perplexity']:.2f}", "0", "-"]]
    rows += [[m, f"{r['perplexity']:.2f}", str(r["adapter_params"]), f"{r['seconds']:.0f}"] for m, r in results.items()]
    table = markdown_table(["method", "eval perplexity", "adapter params", "train s"], rows)
    print(table)
    name = "train_causal_lm_quick" if args.quick else "train_causal_lm"
    path = write_json(name, {"args": vars(args), "before": before, "results": results,
                             "budget": {"init_r": INIT_R, "target_r": TARGET_R, "lora_r": LORA_R}, "table": table})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
