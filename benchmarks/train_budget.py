"""Accuracy against parameters: AdaLoRA (ours) vs LoRA (ours, same code path) at equal final parameter counts.

MiniLM-L6 sequence classification. Each budget is a LoRA configuration (rank, modules); AdaLoRA gets that
LoRA's parameter count as its final budget (`--budget`, counted r * (in + out + 1), so it ends at or just
below LoRA's r * (in + out)) and starts at init_r = max(2, ceil(1.5 x LoRA's mean rank per adapted map)),
the paper's 1.5x. Every (data set, budget, method) takes its best lr from a grid on seed 0, then runs the
other seeds at that lr. Runs go to a JSONL journal, so a stopped sweep resumes where it stopped.

    python benchmarks/train_budget.py --quick        # tiny random BERT on synthetic data (seconds)
    python benchmarks/train_budget.py --jobs 2       # the full sweep (an hour on 2 cores)
    python benchmarks/train_budget.py --datasets trec50 --budgets r1-attn --seeds 1 --orth-reg-weight 0.1

Prints the table, writes benchmarks/results/train_budget[_quick].json and docs/img/train_budget.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, markdown_table, mean_std, quick_assets, write_json  # noqa: E402
from train_quality import dataset_files  # noqa: E402

DATASETS = ("trec6", "rt-sentiment", "trec50", "rt-critics")
ATTENTION = {"bert": ("query", "key", "value", "attention.output.dense")}
LRS = {"adalora": (3e-3, 1e-2), "lora": (1e-3, 3e-3, 1e-2)}
IMG = Path(__file__).resolve().parents[1] / "docs" / "img" / "train_budget.png"


@dataclass(frozen=True)
class Budget:
    """A LoRA configuration whose parameter count is the budget: rank `r` on the attention maps only or on
    every default target."""

    name: str
    r: int
    attention_only: bool = False


BUDGETS = {b.name: b for b in (Budget("r1-attn", 1, True), Budget("r1", 1), Budget("r2", 2), Budget("r8", 8))}


@dataclass(frozen=True)
class Run:
    dataset: str
    budget: str
    method: str
    lr: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.dataset}|{self.budget}|{self.method}|{self.lr:g}|{self.seed}"


def module_dims(model: str) -> tuple[str, dict[str, tuple[int, int]]]:
    """(model_type, {module path: (in, out)}) of the default targets, from the config alone."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from adalora.inject import resolve_targets
    from adalora.layers import linear_dims

    config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        net = AutoModelForSequenceClassification.from_config(config)
    return config.model_type, {p: tuple(linear_dims(net.get_submodule(p))) for p in resolve_targets(net, ())}


def lora_targets(budget: Budget, model_type: str) -> tuple[str, ...]:
    return ATTENTION[model_type] if budget.attention_only else ()


def lora_param_count(budget: Budget, model_type: str, dims: dict[str, tuple[int, int]]) -> int:
    """LoRA's r * (in + out) over the modules the budget adapts."""
    from adalora.inject import matches

    targets = lora_targets(budget, model_type)
    return sum(budget.r * (i + o) for p, (i, o) in dims.items() if not targets or any(matches(p, t) for t in targets))


def adalora_init_r(params: int, dims: dict[str, tuple[int, int]]) -> int:
    """max(2, ceil(1.5 x the mean rank `params` buys over every adapted map))."""
    mean_rank = params / sum(i + o + 1 for i, o in dims.values())
    return max(2, math.ceil(1.5 * mean_rank - 1e-9))


def spec_for(run: Run, files: dict, args: argparse.Namespace, out: str):
    from adalora.config import AdapterShape
    from adalora.recipe import TrainSpec

    budget = BUDGETS[run.budget]
    model_type, dims = module_dims(args.model)
    params = lora_param_count(budget, model_type, dims)
    extra = dict(orth_reg_weight=args.orth_reg_weight, lambda_lr_scale=args.lambda_lr_scale) if args.variant else {}
    if run.method == "lora":
        shape = AdapterShape(mode="lora", init_r=budget.r, target_modules=lora_targets(budget, model_type),
                             lora_alpha=args.lora_alpha)
    else:
        shape = AdapterShape(mode="adalora", init_r=adalora_init_r(params, dims), budget=params,
                             lora_alpha=args.lora_alpha, **extra)
    train, eval_path, labels = files[run.dataset]
    return TrainSpec(base_model=args.model, task="seq-cls", data=train, eval_data=eval_path, out=out, labels=labels,
                     epochs=args.epochs, lr=run.lr, seed=run.seed, batch_size=args.batch_size,
                     max_length=args.max_length, device="cpu", progress=False, adapter=shape,
                     **schedule_variant(args, train))


def schedule_variant(args: argparse.Namespace, train: str) -> dict:
    """Schedule steps from --tinit-frac / --tfinal-frac (a variant); None keeps the default fractions."""
    if args.tinit_frac is None and args.tfinal_frac is None:
        return {}
    from adalora.config import schedule_from_fractions
    from adalora.training import steps_for_epochs

    rows = sum(1 for line in Path(train).read_text().splitlines() if line.strip())
    total = steps_for_epochs(rows, args.batch_size, args.epochs)
    sched = schedule_from_fractions(total, tinit=args.tinit_frac if args.tinit_frac is not None else 0.1,
                                    tfinal=args.tfinal_frac if args.tfinal_frac is not None else 0.2)
    return {"total_steps": total, "epochs": None, **sched}


def execute(job: tuple[Run, dict, argparse.Namespace]) -> dict:
    """One training run in a worker process (one thread: the sweep runs --jobs of them side by side)."""
    import torch
    import transformers

    from adalora.recipe import run_train

    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    run, files, args = job
    with tempfile.TemporaryDirectory(prefix="adalora-budget-") as out:
        report = run_train(spec_for(run, files, args, out))
    return {"key": run.key, "dataset": run.dataset, "budget": run.budget, "method": run.method, "lr": run.lr,
            "seed": run.seed, "accuracy": report["eval"]["accuracy"], "params": report["adapter_params"],
            "steps": report["steps"], "seconds": report["seconds"]}


def load_journal(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    return {r["key"]: r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())}


def run_all(runs: list[Run], files: dict, args: argparse.Namespace, journal: Path, done: dict[str, dict]) -> None:
    todo = [r for r in runs if r.key not in done]
    if not todo or args.report_only:
        return
    with ProcessPoolExecutor(max_workers=args.jobs) as pool, open(journal, "a") as log:
        for result in pool.map(execute, [(r, files, args) for r in todo]):
            done[result["key"]] = result
            log.write(json.dumps(result) + "\n")
            log.flush()
            print(f"  {result['dataset']:12s} {result['budget']:7s} {result['method']:7s} lr={result['lr']:g} "
                  f"seed={result['seed']}: acc={result['accuracy']:.4f} params={result['params']} "
                  f"({result['seconds']:.0f} s)", flush=True)


def sweep(args: argparse.Namespace, files: dict, journal: Path) -> dict:
    """Seed 0 over each cell's lr grid, then the other seeds at the best lr. Returns the cells' summaries."""
    done = load_journal(journal)
    cells = [(d, b, m) for d in files for b in args.budgets for m in ("lora", "adalora")]
    lrs = {m: args.lrs or LRS[m] for m in ("lora", "adalora")}
    grid_sets = [d for d in files if d in (args.grid_datasets or files)]
    run_all([Run(d, b, m, lr, 0) for d, b, m in cells if d in grid_sets for lr in lrs[m]], files, args, journal, done)
    seed0 = lambda d, b, m, lr: done.get(Run(d, b, m, lr, 0).key, {"accuracy": -1.0})["accuracy"]  # noqa: E731
    best = {(d, b, m): max(lrs[m], key=lambda lr: seed0(d, b, m, lr) if d in grid_sets else
                           sum(seed0(g, b, m, lr) for g in grid_sets)) for d, b, m in cells}
    run_all([Run(*c, best[c], 0) for c in cells if c[0] not in grid_sets], files, args, journal, done)
    by_budget = sorted(cells, key=lambda c: args.budgets.index(c[1]))  # the smallest budgets' seeds first
    run_all([Run(*c, best[c], s) for c in by_budget for s in range(1, args.seeds)], files, args, journal, done)
    summary = {}
    for c in cells:
        results = [done[key] for s in range(args.seeds) if (key := Run(*c, best[c], s).key) in done]
        if not results:  # --report-only before the cell ran
            continue
        accs = [r["accuracy"] for r in results]
        summary["|".join(c)] = {"dataset": c[0], "budget": c[1], "method": c[2], "best_lr": best[c],
                                "lr_grid_seed0": {f"{lr:g}": done[Run(*c, lr, 0).key]["accuracy"] for lr in lrs[c[2]]
                                                  if Run(*c, lr, 0).key in done},
                                "accuracies": accs, "mean": mean_std(accs)[0], "std": mean_std(accs)[1],
                                "params": results[0]["params"], "steps": results[0]["steps"]}
    return summary


def gaps(summary: dict, datasets: list[str], budgets: list[str]) -> dict[str, float]:
    """Mean over data sets of AdaLoRA's minus LoRA's mean accuracy, per budget (points); a budget counts only
    where every data set has both cells."""
    cell = lambda d, b, m: summary[f"{d}|{b}|{m}"]["mean"]  # noqa: E731
    complete = [b for b in budgets if all(f"{d}|{b}|{m}" in summary for d in datasets for m in ("lora", "adalora"))]
    return {b: 100 * sum(cell(d, b, "adalora") - cell(d, b, "lora") for d in datasets) / len(datasets) for b in complete}


def cell_text(cell: dict) -> str:
    """mean ± std in points, with the number of seeds where it is not 3."""
    n = len(cell["accuracies"])
    return f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f}" + ("" if n == 3 else f" ({n} seed{'s' * (n > 1)})")


def table(summary: dict, datasets: list[str], budgets: list[str]) -> str:
    headers = ["data set", "budget", "LoRA params", "AdaLoRA params", "LoRA acc %", "AdaLoRA acc %", "gap (pts)",
               "best lr LoRA / AdaLoRA"]
    rows = []
    for d in datasets:
        for b in budgets:
            if f"{d}|{b}|lora" not in summary or f"{d}|{b}|adalora" not in summary:
                continue
            lo, ada = summary[f"{d}|{b}|lora"], summary[f"{d}|{b}|adalora"]
            rows.append([d, b, lo["params"], ada["params"], cell_text(lo), cell_text(ada),
                         f"{100 * (ada['mean'] - lo['mean']):+.1f}",
                         f"{lo['best_lr']:g} / {ada['best_lr']:g}"])
    for b, gap in gaps(summary, datasets, budgets).items():
        rows.append(["mean", b, "", "", "", "", f"{gap:+.2f}", ""])
    return markdown_table(headers, rows)


def plot(summary: dict, datasets: list[str], budgets: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.6), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        for method, color in (("lora", "tab:blue"), ("adalora", "tab:red")):
            cells = [summary[k] for b in budgets if (k := f"{d}|{b}|{method}") in summary]
            ax.errorbar([c["params"] for c in cells], [100 * c["mean"] for c in cells],
                        yerr=[100 * c["std"] for c in cells], marker="o", capsize=3, color=color,
                        label="AdaLoRA" if method == "adalora" else "LoRA")
        ax.set_xscale("log")
        ax.set_title(d)
        ax.set_xlabel("adapter parameters")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("eval accuracy (%), mean ± std of seeds")
    axes[0][0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny random BERT + synthetic data (seconds)")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    p.add_argument("--seeds", type=int, default=3, help="seeds per cell at its best lr (seed 0 picks the lr)")
    p.add_argument("--lrs", nargs="+", type=float, default=None,
                   help=f"one lr grid for both methods (default: {LRS})")
    p.add_argument("--grid-datasets", nargs="+", default=None, choices=DATASETS,
                   help="search the lr grid on these data sets only; the others take, per budget and method, the lr "
                        "with the best summed seed-0 accuracy on them (default: every data set has its own grid)")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--max-train", type=int, default=1000, help="the first N training rows of each data set")
    p.add_argument("--lora-alpha", type=float, default=8.0)
    p.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                   help="runs side by side, one thread each")
    p.add_argument("--name", default=None, help="results name (default train_budget[_quick]); the journal is "
                                                "benchmarks/results/<name>.runs.jsonl")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: the table and plot from the journal's finished runs (a cell shows the seeds it has)")
    p.add_argument("--cache", default=None, help="asset cache (default $ADALORA_CACHE or ~/.cache/adalora)")
    variant = p.add_argument_group("AdaLoRA variants (any of these makes the run a variant; name it with --name)")
    variant.add_argument("--orth-reg-weight", type=float, default=None)
    variant.add_argument("--lambda-lr-scale", type=float, default=None)
    variant.add_argument("--tinit-frac", type=float, default=None, help="warm-up fraction before pruning (0.1)")
    variant.add_argument("--tfinal-frac", type=float, default=None, help="final fixed-mask fraction (0.2)")
    args = p.parse_args(argv)
    from adalora.config import DEFAULT_LAMBDA_LR_SCALE, AdapterShape

    changed = [n for n in ("orth_reg_weight", "lambda_lr_scale", "tinit_frac", "tfinal_frac")
               if getattr(args, n) is not None]
    args.variant = bool(changed)
    if args.variant and args.name is None:
        p.error(f"{', '.join('--' + n.replace('_', '-') for n in changed)} make a variant: name its results with --name")
    args.orth_reg_weight = AdapterShape.orth_reg_weight if args.orth_reg_weight is None else args.orth_reg_weight
    args.lambda_lr_scale = DEFAULT_LAMBDA_LR_SCALE if args.lambda_lr_scale is None else args.lambda_lr_scale
    if args.jobs < 1 or args.seeds < 1 or args.max_train < 1:
        p.error("--jobs, --seeds and --max-train must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    name = args.name or ("train_budget_quick" if args.quick else "train_budget")
    with tempfile.TemporaryDirectory(prefix="adalora-budget-") as tmp_name:
        tmp = Path(tmp_name)
        if args.quick:
            quick = quick_assets(tmp / "quick")
            args.model, args.epochs, args.lrs, args.seeds = quick["bert"], 4.0, [3e-3], min(args.seeds, 2)
            files = {"synthetic": (quick["seq-cls"]["train"], quick["seq-cls"]["eval"], None)}
            journal = tmp / "runs.jsonl"  # quick results are not resumed
        else:
            from adalora import assets

            args.model = str(assets.model_path("minilm-l6", args.cache))
            # every label of the data set: the first --max-train rows may miss a rare one the eval split has
            files = {d: (*dataset_files(d, args.cache, args.max_train, tmp), tuple(assets.dataset_meta(d, args.cache)["labels"]))
                     for d in args.datasets}
            journal = RESULTS / f"{name}.runs.jsonl"
        summary = sweep(args, files, journal)
    datasets = list(files)
    text = table(summary, datasets, args.budgets)
    print(text)
    small = [b for b in BUDGETS if b in args.budgets][:2]  # BUDGETS is in increasing order
    small_gaps = gaps(summary, datasets, small)
    small_gap = sum(small_gaps.values()) / len(small_gaps) if small_gaps else float("nan")
    print(f"AdaLoRA - LoRA at the two smallest budgets ({', '.join(small)}), mean over data sets: {small_gap:+.2f} pts")
    path = write_json(name, {"args": vars(args), "summary": summary, "table": text,
                             "two_smallest_gap_pts": small_gap})
    print(f"results: {path}")
    if not args.no_plot:
        img = (RESULTS if args.quick else IMG.parent) / f"{name}.png"
        plot(summary, datasets, args.budgets, img)
        print(f"plot: {img}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
