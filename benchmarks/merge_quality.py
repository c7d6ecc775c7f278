"""Merge quality: three MiniLM seq-cls adapters (TREC-6, SMS spam, RT sentiment), backbone updates merged
with each method over a small grid; each task evaluated with its own head; normalized accuracy =
merged / that task's own adapter, per task and on average.

    python benchmarks/merge_quality.py --adapters TREC_DIR SMS_DIR RT_DIR   # adapters from `adalora train`
    python benchmarks/merge_quality.py --quick   # trains three tiny adapters on synthetic data (seconds)

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

from adalora.adapter_file import load_adapter  # noqa: E402
from adalora.data import Example, evaluate, load_examples  # noqa: E402
from adalora.inject import attach_adapter  # noqa: E402
from adalora.tools.merge import MergeParams, merge_adapters  # noqa: E402

TASKS = ("trec6", "sms-spam", "rt-sentiment")


def grid(summed_params: int, n: int, quick: bool = False) -> list[tuple[str, str, MergeParams]]:
    """(label, method, params): uniform weights 1/n and 1, densities 0.3 / 0.6, svd at half the summed budget.

    quick: weights 1/n and density 0.3 only."""
    rows = []
    for w in ((1.0 / n,) if quick else (1.0 / n, 1.0)):
        weights = (w,) * n
        rows.append((f"linear w={w:.2f}", "linear", MergeParams(weights=weights)))
        rows.append((f"svd half-budget w={w:.2f}", "svd", MergeParams(weights=weights, budget=summed_params // 2)))
        for d in ((0.3,) if quick else (0.3, 0.6)):
            rows.append((f"ties d={d} w={w:.2f}", "ties", MergeParams(weights=weights, density=d)))
            rows.append((f"dare_ties d={d} w={w:.2f}", "dare_ties", MergeParams(weights=weights, density=d, seed=0)))
            rows.append((f"dare_linear d={d} w={w:.2f}", "dare_linear", MergeParams(weights=weights, density=d, seed=0)))
            rows.append((f"magnitude_prune d={d} w={w:.2f}", "magnitude_prune", MergeParams(weights=weights, density=d)))
    return rows


def accuracy(base_dir, adapter, examples, tokenizer) -> float:
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=len(adapter.labels)).eval()
    attach_adapter(model, adapter)
    return evaluate(model, examples, tokenizer, "seq-cls", labels=adapter.labels)["accuracy"]


def run(base_dir, adapters, evals, names, tokenizer, quick: bool = False) -> dict:
    own = [accuracy(base_dir, a, ev, tokenizer) for a, ev in zip(adapters, evals)]
    results = {"own_accuracy": dict(zip(names, own)), "merges": []}
    summed = sum(a.num_params() for a in adapters)
    for label, method, params in grid(summed, len(adapters), quick):
        merged = merge_adapters(adapters, method, params)
        norm = {}
        for name, a, ev, acc in zip(names, adapters, evals, own):
            with_head = dataclasses.replace(merged, head=a.head, labels=a.labels)  # each task keeps its own head
            norm[name] = accuracy(base_dir, with_head, ev, tokenizer) / max(acc, 1e-9)
        avg = sum(norm.values()) / len(norm)
        results["merges"].append({"label": label, "method": method, "params": params.to_dict(),
                                  "merged_params": merged.num_params(), "normalized": norm, "average": avg})
    return results


def print_table(results: dict, names) -> None:
    print("| merge | params | " + " | ".join(names) + " | average |")
    print("|---|---|" + "---|" * (len(names) + 1))
    print("| own adapters | - | " + " | ".join(f"{results['own_accuracy'][n]:.3f} (acc)" for n in names) + " | 1.000 |")
    for m in sorted(results["merges"], key=lambda m: -m["average"]):
        print(f"| {m['label']} | {m['merged_params']} | " + " | ".join(f"{m['normalized'][n]:.3f}" for n in names)
              + f" | {m['average']:.3f} |")


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
    adapters, evals = [], []
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
    return folder / "base", adapters, evals, tokenizer, list(QUICK_TASKS)


def _final_masks(adapter_set):
    """Kept ranks of a trained set: entries whose lam the allocator zeroed are dropped."""
    return {p: layer.lam.detach() != 0 for p, layer in adapter_set.layers.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--adapters", nargs=3, metavar="DIR", help="trained adapters for " + ", ".join(TASKS))
    ap.add_argument("--base-model", help="default: the prepared minilm-l6")
    ap.add_argument("--max-eval", type=int, default=1000, help="eval rows per task")
    args = ap.parse_args()
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            base_dir, adapters, evals, tokenizer, names = quick_setup(Path(tmp))
        else:
            if not args.adapters:
                ap.error("give --adapters TREC_DIR SMS_DIR RT_DIR (or --quick)")
            from adalora.assets import dataset_path, model_path
            base_dir = args.base_model or model_path("minilm-l6")
            adapters = [load_adapter(p) for p in args.adapters]
            evals = [load_examples(dataset_path(n, "eval"), "seq-cls")[:args.max_eval] for n in TASKS]
            tokenizer, names = AutoTokenizer.from_pretrained(base_dir), list(TASKS)
        results = run(base_dir, adapters, evals, names, tokenizer, args.quick)
    results["quick"] = args.quick
    print_table(results, names)
    out = ROOT / "benchmarks" / "results" / f"merge_quality{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
