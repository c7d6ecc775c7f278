"""`adalora train` end to end on tiny random models saved to disk, and its error cases (exit 2, nothing written)."""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertForSequenceClassification, LlamaForCausalLM, PreTrainedTokenizerFast

from adalora.adapter_file import load_adapter
from adalora.cli import main
from adalora.config import AdaLoraConfig
from adalora.inject import attach_adapter, inject_adapters
from tests.conftest import tiny_bert_config, tiny_llama_config

WORDS = ["good", "bad", "movie", "film", "great", "awful", "plot", "actor", "fun", "boring", "the", "a", "is",
         "was", "very", "not", "question", "answer", "what", "why"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<s>", "</s>"]


def make_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bert":
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


def save_tiny_model(folder: Path, kind: str, seed: int = 0, num_labels: int = 2) -> Path:
    """A tiny random BERT (seq-cls) or Llama (causal-lm) plus a word-level tokenizer, saved offline."""
    torch.manual_seed(seed)
    if kind == "bert":
        config = tiny_bert_config(num_labels)
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
        model = BertForSequenceClassification(config)
    else:
        model = LlamaForCausalLM(tiny_llama_config())
    model.save_pretrained(folder)
    make_tokenizer(kind).save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cls_rows(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        pos = i % 2 == 0
        words = [WORDS[int(j)] for j in torch.randint(6, len(WORDS), (4,), generator=g)]
        words.insert(int(torch.randint(0, 4, (1,), generator=g)), "good" if pos else "bad")
        rows.append({"text": " ".join(words), "label": "pos" if pos else "neg"})
    return rows


def lm_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        if i % 2:
            rows.append({"prompt": "what is the movie", "completion": "the movie is " + WORDS[i % 6]})
        else:
            rows.append({"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(6))})
    return rows


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("bert"), "bert")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


def _train(argv: list[str]) -> int:
    return main(["train", "--no-progress", "--device", "cpu", *argv])


CASES = [
    # (name, model fixture, task, rows, extra args)
    ("bert-seq-cls", "bert_dir", "seq-cls", cls_rows(48), ["--target-r", "4"]),
    ("llama-causal-lm", "llama_dir", "causal-lm", lm_rows(24), ["--target-modules", "q_proj", "v_proj", "down_proj",
                                                                 "--budget", "1500"]),
]


@pytest.mark.parametrize("name,model_fixture,task,rows,extra", CASES, ids=[c[0] for c in CASES])
def test_train_end_to_end(request, tmp_path, capsys, name, model_fixture, task, rows, extra):
    base = request.getfixturevalue(model_fixture)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    evald = write_jsonl(tmp_path / "eval.jsonl", rows[:8])
    out = tmp_path / "out"
    rc = _train(["--base-model", str(base), "--task", task, "--data", str(data), "--eval-data", str(evald),
                 "--out", str(out), "--init-r", "6", "--total-steps", "20", "--batch-size", "8", "--lr", "0.01",
                 "--tinit", "4", "--tfinal", "4", "--deltaT", "2", *extra])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "layer" in printed and "report.json" in printed
    report = json.loads((out / "report.json").read_text())
    for key in ("mode", "task", "base", "ranks", "ranks_table", "adapter_params", "head_params", "budget", "eval",
                "final_loss", "steps", "seconds", "seconds_per_step", "config", "train_args"):
        assert key in report, key
    assert report["steps"] == 20 and report["eval"]
    assert (out / "ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    adapter = load_adapter(out)
    ranks = adapter.ranks()
    assert ranks == report["ranks"]
    budget = report["budget"]
    assert sum(ranks.values()) == budget["reached_triplets"]
    assert adapter.num_params() == budget["reached_params"] == report["adapter_params"]
    if budget["unit"] == "params":
        assert budget["reached_params"] <= budget["target"]
    else:
        assert budget["reached_triplets"] == budget["target"]
    assert 0 < sum(ranks.values()) < 6 * len(ranks)

    # compact adapter forward == the masked full-size forward it was exported from
    model_cls = BertForSequenceClassification if task == "seq-cls" else LlamaForCausalLM
    kwargs = {"num_labels": 2} if task == "seq-cls" else {}
    compact = model_cls.from_pretrained(base, **kwargs).eval()
    attach_adapter(compact, adapter)
    full = model_cls.from_pretrained(base, **kwargs).eval()
    config = AdaLoraConfig(**{**report["config"], "target_modules": tuple(report["config"]["target_modules"])})
    adapters = inject_adapters(full, config, task_type=task, labels=adapter.labels, paths=list(adapter.shapes))
    _load_full_from_report(adapters, out)
    x = torch.randint(6, 26, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(compact(input_ids=x).logits, full(input_ids=x).logits, atol=1e-5, rtol=1e-5)


def _load_full_from_report(adapters, out: Path) -> None:
    """Place the compact factors into a full-rank injected model at masked positions (lam 0 elsewhere)."""
    adapter = load_adapter(out)
    with torch.no_grad():
        for path, layer in adapters.layers.items():
            layer.lam.zero_()
            if path in adapter.layers:
                r = adapter.layers[path].rank
                layer.P[:, :r] = adapter.layers[path].P
                layer.lam[:r] = adapter.layers[path].lam
                layer.Q[:r] = adapter.layers[path].Q
        for name, module in adapters.head.items():
            for pname, p in module.named_parameters():
                p.copy_(adapter.head[f"{name}.{pname}"])


def test_lora_mode_keeps_all_ranks(bert_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", cls_rows(16))
    out = tmp_path / "out"
    assert _train(["--base-model", str(bert_dir), "--task", "seq-cls", "--data", str(data), "--out", str(out),
                   "--mode", "lora", "--init-r", "2", "--total-steps", "3", "--batch-size", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["ranks"].values()) == {2}


def _error_case(tmp_path, bert_dir, llama_dir, case):
    data = tmp_path / "train.jsonl"
    write_jsonl(data, cls_rows(16))
    base, task = bert_dir, "seq-cls"
    argv = ["--total-steps", "10", "--batch-size", "4"]
    if case == "schedule":
        argv += ["--tinit", "6", "--tfinal", "6"]
    elif case == "target":
        argv += ["--target-modules", "nonexistent_proj"]
    elif case == "empty":
        data.write_text("")
    elif case == "malformed":
        data.write_text(json.dumps(cls_rows(1)[0]) + "\n{not json\n")
    elif case == "eval-label":
        write_jsonl(tmp_path / "eval.jsonl", [{"text": "good movie", "label": "neutral"}])
        argv += ["--eval-data", str(tmp_path / "eval.jsonl")]
    elif case == "nan":
        base, task = llama_dir, "causal-lm"
        write_jsonl(data, lm_rows(16))
        argv += ["--lr", "1e30"]
    return ["--base-model", str(base), "--task", task, "--data", str(data), "--out", str(tmp_path / "out"), *argv]


ERROR_CASES = [
    ("schedule", "tinit"),
    ("target", "available linear modules"),
    ("empty", "empty"),
    ("malformed", "train.jsonl:2"),
    ("eval-label", "'neutral'"),
    ("nan", "at step"),
]


@pytest.mark.parametrize("case,needle", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_train_errors_exit_2_and_write_nothing(tmp_path, capsys, bert_dir, llama_dir, case, needle):
    rc = _train(_error_case(tmp_path, bert_dir, llama_dir, case))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "adalora train: error:" in err and needle in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_existing_nonempty_out_is_refused_and_untouched(tmp_path, bert_dir):
    data = write_jsonl(tmp_path / "train.jsonl", cls_rows(8))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = _train(["--base-model", str(bert_dir), "--task", "seq-cls", "--data", str(data), "--out", str(out),
                 "--total-steps", "5"])
    assert rc == 2
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


RANK_TABLE_CASES = [
    # (name, ranks, layers, kinds, matrix)
    ("llama", {"model.layers.0.self_attn.q_proj": 3, "model.layers.0.mlp.down_proj": 1,
               "model.layers.1.self_attn.q_proj": 0, "model.layers.1.mlp.down_proj": 5},
     [0, 1], ["q_proj", "down_proj"], [[3, 1], [0, 5]]),
    ("bert", {"bert.encoder.layer.0.attention.self.query": 2, "bert.encoder.layer.0.attention.output.dense": 4,
              "bert.encoder.layer.0.output.dense": 1, "bert.encoder.layer.2.intermediate.dense": 6},
     [0, 2], ["query", "attention.output.dense", "output.dense", "intermediate.dense"],
     [[2, 4, 1, None], [None, None, None, 6]]),
    ("no-layer", {"proj": 2, "h.1.c_attn": 3}, [-1, 1], ["proj", "c_attn"], [[2, None], [None, 3]]),
]


@pytest.mark.parametrize("name,ranks,layers,kinds,matrix", RANK_TABLE_CASES, ids=[c[0] for c in RANK_TABLE_CASES])
def test_rank_table(tmp_path, name, ranks, layers, kinds, matrix):
    from adalora.report import format_rank_table, plot_rank_heatmap, rank_table

    assert rank_table(ranks) == (layers, kinds, matrix)
    text = format_rank_table(ranks)
    assert all(k in text for k in kinds) and f"total rank {sum(ranks.values())}" in text
    plot_rank_heatmap(ranks, tmp_path / "r.png", name)
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_warmup_too_long_is_a_clean_error(tmp_path, capsys, bert_dir):
    data = write_jsonl(tmp_path / "train.jsonl", cls_rows(8))
    rc = _train(["--base-model", str(bert_dir), "--task", "seq-cls", "--data", str(data), "--out",
                 str(tmp_path / "out"), "--total-steps", "5", "--warmup-steps", "9"])
    assert rc == 2 and "warmup_steps=9" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
