"""Training data: load and validate examples, batches as a pure function of the step, evaluation.

Files are .jsonl (one JSON object per line) or .csv (a header row). Columns:
- seq-cls:   text, label (labels are strings; integers are converted)
- causal-lm: text, or prompt + completion (the loss then covers the completion only)
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

TASKS = ("seq-cls", "causal-lm")
IGNORE_INDEX = -100


class DataError(ValueError):
    """Input data is missing or malformed; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    text: str
    label: str | None = None
    completion: str | None = None


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise DataError(f"task={task!r} is not one of {TASKS}")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: malformed JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            yield line_no, row


def _csv_rows(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            return
        for row in reader:
            if None in row:
                raise DataError(f"{path}:{reader.line_num}: more values than the header has columns")
            yield reader.line_num, row


READERS: dict[str, Callable[[Path], Iterator[tuple[int, dict]]]] = {".jsonl": _jsonl_rows, ".csv": _csv_rows}


def _string(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if value is None:
        raise DataError(f"{where}: missing field {key!r} (fields present: {sorted(row)})")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__} {value!r}")
    return value


def _label(row: dict, where: str) -> str:
    value = row.get("label")
    if value is None:
        raise DataError(f"{where}: missing field 'label' (fields present: {sorted(row)})")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: label must be a string (or an integer), got {type(value).__name__} {value!r}")
    label = str(value)
    if not label.strip():
        raise DataError(f"{where}: empty label")
    return label


def _example(row: dict, task: str, where: str) -> Example:
    if task == "seq-cls":
        return Example(text=_string(row, "text", where), label=_label(row, where))
    if "prompt" in row or "completion" in row:
        return Example(text=_string(row, "prompt", where), completion=_string(row, "completion", where))
    return Example(text=_string(row, "text", where))


def load_examples(path: str | Path, task: str) -> list[Example]:
    """Read and validate every row of a .jsonl or .csv file; errors name the file and line."""
    _check_task(task)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported data file type {path.suffix!r}; use one of {sorted(READERS)}")
    examples = [_example(row, task, f"{path}:{line}") for line, row in reader(path)]
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


def label_set(examples: list[Example]) -> list[str]:
    return sorted({e.label for e in examples if e.label is not None})


def check_labels(examples: list[Example], labels: list[str], source: str = "data") -> None:
    """Every example's label must be one of `labels` (the training label set)."""
    known = set(labels)
    for row, e in enumerate(examples, start=1):
        if e.label not in known:
            raise DataError(f"{source}: row {row} has label {e.label!r}, which is not in the training labels {labels}")


def pad_id(tokenizer) -> int:
    """The tokenizer's pad token, else its eos token (causal LMs often have no pad token)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    raise DataError("the tokenizer has neither a pad nor an eos token; add a pad token to the tokenizer")


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode(examples: list[Example], tokenizer, task: str, max_length: int = 128,
           labels: list[str] | None = None, source: str = "data") -> list[tuple[list[int], list[int] | int]]:
    """(input ids, target) per example: the label index (seq-cls) or per-token labels (causal-lm)."""
    _check_task(task)
    if task == "seq-cls":
        labels = labels if labels is not None else label_set(examples)
        check_labels(examples, labels, source)
        index = {name: i for i, name in enumerate(labels)}
        return [(_ids(tokenizer, e.text, True)[:max_length], index[e.label]) for e in examples]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for e in examples:
        if e.completion is None:
            ids = _ids(tokenizer, e.text, True) + eos
            target = list(ids)
        else:
            prompt = _ids(tokenizer, e.text, True)
            ids = prompt + _ids(tokenizer, e.completion, False) + eos
            target = [IGNORE_INDEX] * len(prompt) + ids[len(prompt):]
        out.append((ids[:max_length], target[:max_length]))
    return out


def collate(rows: list[tuple[list[int], list[int] | int]], pad: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row; padded positions get attention 0 and label -100."""
    width = max(1, max(len(ids) for ids, _ in rows))
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    token_labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for i, (ids, target) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, :len(ids)] = 1
        if not isinstance(target, int):
            token_labels[i, :len(target)] = torch.tensor(target, dtype=torch.long)
    if rows and isinstance(rows[0][1], int):
        labels = torch.tensor([target for _, target in rows], dtype=torch.long)  # (B,)
    else:
        labels = token_labels
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def steps_per_epoch(n_examples: int, batch_size: int, world_size: int = 1) -> int:
    return max(1, math.ceil(n_examples / (batch_size * world_size)))


def batch_indices(step: int, n_examples: int, batch_size: int, seed: int, rank: int = 0,
                  world_size: int = 1) -> list[int]:
    """Rows of this rank's share of the global batch at `step` (a pure function of its arguments).

    Epoch e = step // steps_per_epoch uses the permutation seeded by (seed, e); the global batch of
    batch_size * world_size rows wraps around at the end of the epoch; rank k takes the k-th slice.
    """
    per_epoch = steps_per_epoch(n_examples, batch_size, world_size)
    epoch, i = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_examples, generator=gen).tolist()
    global_bs = batch_size * world_size
    start = i * global_bs + rank * batch_size
    return [perm[(start + j) % n_examples] for j in range(batch_size)]


def make_batches(examples: list[Example], tokenizer, task: str, batch_size: int, seed: int, max_length: int = 128,
                 labels: list[str] | None = None, rank: int = 0, world_size: int = 1
                 ) -> Callable[[int], dict[str, torch.Tensor]]:
    """step -> {input_ids, attention_mask, labels}; everything is tokenized and validated up front."""
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} must be >= 1")
    if not 0 <= rank < world_size:
        raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
    if not examples:
        raise DataError("no examples to make batches from")
    rows = encode(examples, tokenizer, task, max_length, labels)
    pad = pad_id(tokenizer)

    def batch(step: int) -> dict[str, torch.Tensor]:
        idx = batch_indices(step, len(rows), batch_size, seed, rank, world_size)
        return collate([rows[i] for i in idx], pad)

    return batch


@torch.no_grad()
def evaluate(model: torch.nn.Module, examples: list[Example], tokenizer, task: str, labels: list[str] | None = None,
             batch_size: int = 64, max_length: int = 128) -> dict:
    """seq-cls: {"accuracy"}; causal-lm: {"loss": mean token NLL, "perplexity": exp(loss)}.

    The model's train/eval mode is restored afterwards.
    """
    rows = encode(examples, tokenizer, task, max_length, labels)
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct, nll, tokens = 0, 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[start:start + batch_size], pad).items()}
        labels_t = batch.pop("labels")
        logits = model(**batch).logits.float()
        if task == "seq-cls":
            correct += int((logits.argmax(-1) == labels_t).sum())
        else:
            shifted = labels_t[:, 1:]  # (B, T-1): token t predicts token t+1
            nll += float(torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum"))
            tokens += int((shifted != IGNORE_INDEX).sum())
    model.train(was_training)
    if task == "seq-cls":
        return {"accuracy": correct / len(rows)}
    loss = nll / max(1, tokens)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
