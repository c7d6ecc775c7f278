"""Merge quality: six MiniLM seq-cls task adapters, backbone updates merged with each method over a small grid;
each task evaluated with its own head; normalized accuracy = merged / that task's own adapter.

Tasks: TREC-6, SMS spam, RT sentiment, TREC-50 (fine labels), RT critics (fresh / rotten / plot) and chatbot
topics (21 chatterbot-corpus categories). Each adapter is AdaLoRA, init_r 3 pruned to LoRA r=2's parameter
count, trained on the first 1000 training rows for 3 epochs at the default lr (seed 0), like `adalora train`;
--train-dir keeps them, so a rerun only merges. Every method writes the same output budget: the inputs'
summed parameters (what `linear` holds exactly); the dense methods' full-rank results are cut to it by
singular value (what `adalora merge` writes); `svd` also at half of it. `distill` fits one weight per (task,
module) on each task's training rows, unlabeled (the text only), from each --distill-init start.

    python benchmarks/merge_quality.py                      # trains the six adapters once (~10 min), then merges
    python benchmarks/merge_quality.py --adapters trec6=DIR sms-spam=DIR ...   # your own adapters
    python benchmarks/merge_quality.py --quick              # three tiny adapters on synthetic data (seconds)
    python benchmarks/merge_quality.py --methods distill    # rerun one method; the file keeps the others' rows

Prints a markdown table; JSON in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adalora.adapter_file import FILE_NAME, load_adapter  # noqa: E402
from adalora.data import Example, evaluate, load_examples  # noqa: E402
from adalora.inject import attach_adapter  # noqa: E402
from adalora.tools.merge import MergeParams, merge_adapters  # noqa: E402

TASKS = ("trec6", "sms-spam", "rt-sentiment", "trec50", "rt-critics", "chatbot-topics")
TRAIN_ROWS, MAX_LENGTH, LORA_R2_PARAMS = 1000, 64, 82_944
DENSE = ("ties", "dare_ties", "dare_linear", "magnitude_prune")
METHODS = ["distill", "linear", "svd", "isotropic", "decorrelate", *DENSE]


def grid(summed_params: int, n: int, weights: list[float], densities: list[float], data: list[str],
         distill_init: list[float], distill_steps: int) -> list[tuple[str, str, MergeParams]]:
    """(label, method, params) for uniform weights w: every method at the summed budget; svd also at half;
    distill fit on `data` (one unlabeled file per task) from each start weight in distill_init."""
    rows = [(f"distill from w={w:g}", "distill", MergeParams(weights=(w,) * n, data=tuple(data), steps=distill_steps))
            for w in distill_init]
    for w in weights:
        uniform = (w,) * n
        rows.append((f"linear w={w:g}", "linear", MergeParams(weights=uniform)))
        rows.append((f"svd half-budget w={w:g}", "svd", MergeParams(weights=uniform, budget=summed_params // 2)))
        rows.append((f"isotropic w={w:g}", "isotropic", MergeParams(weights=uniform)))
        rows.append((f"decorrelate w={w:g}", "decorrelate", MergeParams(weights=uniform)))
        for d in densities:
            for method in DENSE:
                seed = {"seed": 0} if method.startswith("dare") else {}
                rows.append((f"{method} d={d:g} w={w:g}", method,
                             MergeParams(weights=uniform, density=d, budget=summed_params, **seed)))
    return rows



def accuracy(base_dir, adapter, examples, tokenizer) -> float:
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=len(adapter.labels)).eval()
    attach_adapter(model, adapter)
    return evaluate(model, examples, tokenizer, "seq-cls", labels=adapter.labels, max_length=MAX_LENGTH)["accuracy"]


def run(base_dir, adapters, evals, names, tokenizer, weights, densities, data, distill_init, distill_steps,
        methods) -> dict:
    own = [accuracy(base_dir, a, ev, tokenizer) for a, ev in zip(adapters, evals)]
    results = {"own_accuracy": dict(zip(names, own)), "own_params": [a.num_params() for a in adapters], "merges": []}
    summed = sum(a.num_params() for a in adapters)
    for label, method, params in grid(summed, len(adapters), weights, densities, data, distill_init, distill_steps):
        if method not in methods:
            continue
        merged = merge_adapters(adapters, method, params, base_model_dir=base_dir)
        norm = {}
        for name, a, ev, acc in zip(names, adapters, evals, own):
            with_head = dataclasses.replace(merged, head=a.head, labels=a.labels)  # each task keeps its own head
            norm[name] = accuracy(base_dir, with_head, ev, tokenizer) / max(acc, 1e-9)
        avg = sum(norm.values()) / len(norm)
        results["merges"].append({"label": label, "method": method, "params": params.to_dict(),
                                  "merged_params": merged.num_params(), "normalized": norm, "average": avg})
        print(f"  {label:28s} params={merged.num_params():>9,} average={avg:.3f}", flush=True)
    return results


def kept_rows(out: Path, results: dict, methods: list[str]) -> list[dict]:
    """Rows of an earlier run in `out` for the methods not rerun now, when it measured the same tasks and own
    accuracies (so that rerunning one method updates the table instead of discarding the rest)."""
    if not out.exists():
        return []
    earlier = json.loads(out.read_text())
    if earlier.get("own_accuracy") != results["own_accuracy"]:
        print(f"{out}: an earlier run of other adapters or eval rows; its rows are not kept")
        return []
    return [m for m in earlier["merges"] if m["method"] not in methods]


def print_table(results: dict, names) -> str:
    lines = ["| merge | params | " + " | ".join(names) + " | average |", "|---|---|" + "---|" * (len(names) + 1),
             "| own adapters (accuracy) | " + " / ".join(f"{p / 1000:.1f}k" for p in results["own_params"]) + " | "
             + " | ".join(f"{results['own_accuracy'][n]:.3f}" for n in names) + " | 1.000 |"]
    for m in sorted(results["merges"], key=lambda m: -m["average"]):
        lines.append(f"| {m['label']} | {m['merged_params']:,} | " + " | ".join(f"{m['normalized'][n]:.3f}" for n in names)
                     + f" | {m['average']:.3f} |")
    best = {}
    for m in results["merges"]:
        if m["average"] > best.get(m["method"], {"average": -1})["average"]:
            best[m["method"]] = m
    lines += ["", "| method (best of its grid) | average |", "|---|---|"]
    lines += [f"| {b['label']} | {b['average']:.3f} |" for b in sorted(best.values(), key=lambda m: -m["average"])]
    table = "\n".join(lines)
    print(table)
    return table


def train_rows(train_dir: Path, task: str, cache: str | None) -> Path:
    """The task's first TRAIN_ROWS training rows as a file (what its adapter trains on, and distill's unlabeled
    rows: the fit reads their text only)."""
    from adalora import assets

    data = train_dir / f"{task}-train-{TRAIN_ROWS}.jsonl"
    if not data.exists():
        rows = assets.dataset_path(task, "train", cache).read_text().splitlines(keepends=True)[:TRAIN_ROWS]
        train_dir.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(rows))
    return data


def train_missing(train_dir: Path, tasks: list[str], cache: str | None) -> list[Path]:
    """Each task's adapter folder under train_dir, trained (AdaLoRA, the settings above) where missing."""
    from adalora import assets
    from adalora.config import AdapterShape
    from adalora.recipe import TrainSpec, run_train

    folders = []
    for task in tasks:
        out = train_dir / task
        if not (out / FILE_NAME).exists():
            data = train_rows(train_dir, task, cache)
            print(f"training the {task} adapter into {out}", flush=True)
            run_train(TrainSpec(base_model=str(assets.model_path("minilm-l6", cache)), task="seq-cls", data=str(data),
                                eval_data=str(assets.dataset_path(task, "eval", cache)), out=str(out), epochs=3.0,
                                seed=0, batch_size=32, max_length=MAX_LENGTH, device="cpu", progress=False,
                                labels=tuple(assets.dataset_meta(task, cache)["labels"]),
                                adapter=AdapterShape(mode="adalora", init_r=3, budget=LORA_R2_PARAMS)))
        folders.append(out)
    return folders


# ----------------------------------------------------------------------------- --quick: tiny synthetic tasks

WORDS = ["good", "bad", "spam", "free", "win", "who", "what", "where", "movie", "call", "now", "the", "a", "is",
         "very", "not", "great", "awful", "prize", "hello"]
QUICK_TASKS = {  # name -> (labels, rule: words -> label)
    "who-what": (["who", "what"], lambda ws: "who" if ws.count("who") >= ws.count("what") else "what"),
    "spam": (["ham", "spam"], lambda ws: "spam" if ("free" in ws or "prize" in ws) else "ham"),
    "sentiment": (["neg", "pos"], lambda ws: "pos" if ws.count("good") + ws.count("great") >= ws.count("bad") + ws.count("awful") else "neg"),
}


def quick_setup(folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    from adalora.config import AdaLoraConfig
    from adalora.data import make_batches
    from adalora.inject import inject_adapters
    from adalora.training import TrainArgs, train

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(specials + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(config).save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    rng = random.Random(0)
    adapters, evals, files = [], [], []
    for name, (labels, rule) in QUICK_TASKS.items():
        texts = [" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(250)]
        examples = [Example(text=t, label=rule(t.split())) for t in texts]
        train_ex, eval_ex = examples[:200], examples[200:]
        model = AutoModelForSequenceClassification.from_pretrained(folder / "base", num_labels=len(labels))
        ada = AdaLoraConfig(init_r=4, lora_alpha=8.0, target_r=2, total_step=30, tinit=3, tfinal=6, deltaT=3)
        adapter_set = inject_adapters(model, ada, task_type="seq-cls", labels=labels)
        train(adapter_set, make_batches(train_ex, tokenizer, "seq-cls", 16, seed=0, labels=labels),
              TrainArgs(total_steps=30, lr=1e-2))
        adapters.append(adapter_set.export(_final_masks(adapter_set)))
        evals.append(eval_ex)
        data = folder / f"{name}-train.jsonl"
        data.write_text("".join(json.dumps({"text": e.text}) + "\n" for e in train_ex))
        files.append(str(data))
    return folder / "base", adapters, evals, tokenizer, list(QUICK_TASKS), files


def _final_masks(adapter_set):
    """Kept ranks of a trained set: entries whose lam the allocator zeroed are dropped."""
    return {p: layer.lam.detach() != 0 for p, layer in adapter_set.layers.items()}


def named_adapters(values: list[str]) -> dict[str, str]:
    out = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or name not in TASKS:
            raise SystemExit(f"--adapters {value!r}: give TASK=DIR with TASK one of {', '.join(TASKS)}")
        out[name] = folder
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--adapters", nargs="+", default=[], metavar="TASK=DIR", help="trained adapters to use")
    ap.add_argument("--train-dir", default=str(ROOT / "runs" / "merge-tasks"),
                    help="where the other tasks' adapters are trained once and reused")
    ap.add_argument("--weights", nargs="+", type=float, default=[0.5, 0.7, 1.0, 1.3], help="uniform merge weights tried")
    ap.add_argument("--densities", nargs="+", type=float, default=[0.3, 0.6], help="TIES / DARE / magnitude")
    ap.add_argument("--distill-init", nargs="+", type=float, default=[0.5], help="distill's start weights tried")
    ap.add_argument("--distill-steps", type=int, default=100, help="distill's optimizer steps")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS,
                    help="methods run now; an earlier run's rows of the others are kept in the results file")
    ap.add_argument("--max-eval", type=int, default=500, help="eval rows per task")
    ap.add_argument("--cache", default=None, help="asset cache (default $ADALORA_CACHE or ~/.cache/adalora)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            base_dir, adapters, evals, tokenizer, names, data = quick_setup(Path(tmp))
            args.weights, args.densities, args.distill_steps = [1.0], [0.3], 20
        else:
            from adalora.assets import dataset_path, model_path
            given = named_adapters(args.adapters)
            names = list(args.tasks)
            trained = train_missing(Path(args.train_dir), [t for t in names if t not in given], args.cache)
            folders = {**dict(zip([t for t in names if t not in given], trained)), **given}
            base_dir = model_path("minilm-l6", args.cache)
            adapters = [load_adapter(folders[n]) for n in names]
            evals = [load_examples(dataset_path(n, "eval", args.cache), "seq-cls")[:args.max_eval] for n in names]
            data = [str(train_rows(Path(args.train_dir), n, args.cache)) for n in names]
            tokenizer = AutoTokenizer.from_pretrained(base_dir)
        results = run(base_dir, adapters, evals, names, tokenizer, args.weights, args.densities, data,
                      args.distill_init, args.distill_steps, args.methods)
    out = ROOT / "benchmarks" / "results" / f"merge_quality{'_quick' if args.quick else ''}.json"
    results["merges"] += kept_rows(out, results, args.methods)
    results["quick"] = args.quick
    results["table"] = print_table(results, names)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
