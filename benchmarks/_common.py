"""Shared benchmark helpers: markdown tables, JSON results, timing, and tiny --quick assets."""

from __future__ import annotations

import json
import random
import statistics
import tempfile
from pathlib import Path

from adalora.atomic import write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_WORDS = [f"w{i}" for i in range(40)]
QUICK_LABELS = ["alpha", "beta", "gamma"]


def markdown_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def write_json(name: str, payload: dict, results: Path = RESULTS) -> Path:
    path = results / f"{name}.json"
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    return path


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt_mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    m, s = mean_std([v * scale for v in values])
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def median(values: list[float]) -> float:
    return statistics.median(values)


def _tokenizer(special: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(special + QUICK_WORDS + QUICK_LABELS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]",
                                   eos_token="[EOS]", cls_token="[CLS]", sep_token="[SEP]")


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def synthetic_rows(n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(seq-cls rows, causal-lm rows): the label is the class of the first marker word in the text."""
    rng = random.Random(seed)
    cls_rows, lm_rows = [], []
    for _ in range(n):
        words = rng.choices(QUICK_WORDS, k=rng.randint(4, 10))
        label = QUICK_LABELS[int(words[0][1:]) % len(QUICK_LABELS)]
        cls_rows.append({"text": " ".join(words), "label": label})
        start = rng.randrange(len(QUICK_WORDS) - 8)
        lm_rows.append({"prompt": " ".join(QUICK_WORDS[start:start + 4]),
                        "completion": " " + " ".join(QUICK_WORDS[start + 4:start + 8])})
    return cls_rows, lm_rows


def quick_assets(root: str | Path | None = None, n_train: int = 96, n_eval: int = 32) -> dict:
    """Tiny random BERT and Llama folders (with a word-level tokenizer) and synthetic data, in seconds.

    Returns {"bert": dir, "llama": dir, "seq-cls": {"train", "eval"}, "causal-lm": {"train", "eval"}}.
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="adalora-quick-"))
    tok = _tokenizer(["[PAD]", "[UNK]", "[EOS]", "[CLS]", "[SEP]"])
    vocab = len(tok)
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, pad_token_id=tok.pad_token_id, num_labels=len(QUICK_LABELS)))
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False))
    out = {}
    for name, model in (("bert", bert), ("llama", llama)):
        folder = root / name
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        out[name] = str(folder)
    cls_rows, lm_rows = synthetic_rows(n_train + n_eval, seed=0)
    for task, rows in (("seq-cls", cls_rows), ("causal-lm", lm_rows)):
        folder = root / "data" / task
        folder.mkdir(parents=True, exist_ok=True)
        out[task] = {"train": _write_jsonl(folder / "train.jsonl", rows[:n_train]),
                     "eval": _write_jsonl(folder / "eval.jsonl", rows[n_train:])}
    out["root"] = str(root)
    return out
