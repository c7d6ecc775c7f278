"""`adalora convert` / `adalora inspect` in-process: outputs, exit codes, and every error path writes nothing."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file

from adalora.adapter_file import load_adapter, save_adapter, tensors_sha256, to_tensors
from adalora.cli import main
from adalora.commands.inspect import rank_table
from tests.test_peft_interop import base_dir, llama_base, native_adapter, train_peft_adalora


@pytest.fixture
def peft_dir(tmp_path):
    train_peft_adalora("bert", tmp_path / "peft")
    return tmp_path / "peft"


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_convert_both_ways_and_inspect_agree(tmp_path, capsys, peft_dir):
    base = base_dir(tmp_path, "bert")
    code, out, _ = run_cli(capsys, "convert", peft_dir, tmp_path / "native", "--to", "native", "--base-model", base,
                           "--labels", "neg,neu,pos")
    assert code == 0 and "-> " in out
    native = load_adapter(tmp_path / "native")
    assert native.labels == ["neg", "neu", "pos"] and native.task_type == "seq-cls"
    code, _, _ = run_cli(capsys, "convert", tmp_path / "native", tmp_path / "peft2", "--to", "peft")
    assert code == 0
    sha = tensors_sha256(to_tensors(native))
    for path, fmt in ((tmp_path / "native", "native"), (tmp_path / "peft2", "peft"), (peft_dir, "peft")):
        code, out, _ = run_cli(capsys, "inspect", path, "--json")
        d = json.loads(out)
        assert code == 0 and d["format"] == fmt and d["tensors_sha256"] == sha
        assert d["ranks"] == native.ranks() and d["num_params"] == native.num_params()
        assert d["head_params"] == 3 * 32 + 3 and d["bytes_on_disk"] > 0
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "native")
    assert code == 0 and "layer" in out and "query" in out and "dense" in out and "neg, neu, pos" in out


def test_peft_import_without_labels_gets_default_names(tmp_path, capsys, peft_dir):
    code, _, _ = run_cli(capsys, "convert", peft_dir, tmp_path / "n", "--to", "native", "--base-model",
                         base_dir(tmp_path, "bert"))
    assert code == 0 and load_adapter(tmp_path / "n").labels == ["LABEL_0", "LABEL_1", "LABEL_2"]


def _dora_dir(tmp_path):
    model = get_peft_model(llama_base(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "dora")
    return tmp_path / "dora"


def _embedding_dir(tmp_path):
    model = get_peft_model(llama_base(), LoraConfig(r=2, target_modules=["embed_tokens"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "emb")
    return tmp_path / "emb"


def _bad_key_dir(tmp_path, peft_dir):
    file = peft_dir / "adapter_model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["base_model.model.bert.pooler.dense.weird"] = torch.zeros(2)
    save_file(tensors, str(file))
    return peft_dir


def _wrong_base(tmp_path):
    path = tmp_path / "other-base"
    from transformers import BertConfig, BertForSequenceClassification

    BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                             num_attention_heads=4, num_labels=3)).save_pretrained(path)
    return path


def _unknown_dir(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    return tmp_path / "junk"


# case -> (make source dir (tmp_path, peft_dir), extra args, expected message fragment)
ERROR_CASES = {
    "unknown format": (lambda t, p: _unknown_dir(t), ["--to", "native"], "unknown adapter format"),
    "dora": (lambda t, p: _dora_dir(t), ["--to", "native", "--base-model", "BASE_LLAMA"], "DoRA"),
    "embedding": (lambda t, p: _embedding_dir(t), ["--to", "native", "--base-model", "BASE_LLAMA"], "embedding"),
    "bad key": (_bad_key_dir, ["--to", "native", "--base-model", "BASE_BERT"], "unexpected key"),
    "shape mismatch": (lambda t, p: p, ["--to", "native", "--base-model", "WRONG_BASE"], "base model has"),
    "no base model": (lambda t, p: p, ["--to", "native"], "--base-model"),
    "same format": (lambda t, p: p, ["--to", "peft"], "already in peft format"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_convert_errors_are_clean_and_write_nothing(tmp_path, capsys, peft_dir, case):
    make, extra, message = ERROR_CASES[case]
    src = make(tmp_path, peft_dir)
    subst = {"BASE_LLAMA": lambda: base_dir(tmp_path, "llama"), "BASE_BERT": lambda: base_dir(tmp_path, "bert"),
             "WRONG_BASE": lambda: _wrong_base(tmp_path)}
    extra = [subst[a]() if a in subst else a for a in extra]
    dst = tmp_path / "out"
    code, _, err = run_cli(capsys, "convert", src, dst, *extra)
    assert code == 2 and message in err and "Traceback" not in err
    assert not dst.exists()


@pytest.mark.parametrize("where", ["same", "inside", "parent of file"])
def test_convert_never_writes_over_its_source(tmp_path, capsys, where):
    save_adapter(native_adapter("causal-lm"), tmp_path / "src")
    before = (tmp_path / "src" / "adapter.safetensors").read_bytes()
    src, dst = {"same": (tmp_path / "src", tmp_path / "src"),
                "inside": (tmp_path / "src", tmp_path / "src" / "peft"),
                "parent of file": (tmp_path / "src" / "adapter.safetensors", tmp_path / "src")}[where]
    code, _, err = run_cli(capsys, "convert", src, dst, "--to", "peft", "--force")
    assert code == 2 and "source adapter" in err
    assert (tmp_path / "src" / "adapter.safetensors").read_bytes() == before
    assert not (tmp_path / "src" / "peft").exists() and sorted(p.name for p in (tmp_path / "src").iterdir()) == ["adapter.safetensors"]


def test_convert_refuses_existing_dst_without_force(tmp_path, capsys):
    save_adapter(native_adapter("causal-lm"), tmp_path / "src")
    (tmp_path / "dst").mkdir()
    code, _, err = run_cli(capsys, "convert", tmp_path / "src", tmp_path / "dst", "--to", "peft")
    assert code == 2 and "--force" in err and not any((tmp_path / "dst").iterdir())
    code, _, _ = run_cli(capsys, "convert", tmp_path / "src", tmp_path / "dst", "--to", "peft", "--force")
    assert code == 0 and (tmp_path / "dst" / "adapter_config.json").is_file()


def test_inspect_unknown_dir_is_a_clean_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "inspect", _unknown_dir(tmp_path))
    assert code == 2 and "unknown adapter format" in err


RANK_TABLE_CASES = [
    # (ranks, expected columns, expected rows)
    ({"model.layers.0.self_attn.q_proj": 2, "model.layers.0.mlp.down_proj": 0, "model.layers.1.self_attn.q_proj": 1},
     ["q_proj", "down_proj"], [("0", [2, 0]), ("1", [1, None])]),
    ({"bert.encoder.layer.0.attention.output.dense": 1, "bert.encoder.layer.0.output.dense": 2,
      "bert.encoder.layer.0.intermediate.dense": 3},
     ["attention.output.dense", "output.dense", "intermediate.dense"], [("0", [1, 2, 3])]),
    ({"lm_head": 4}, ["lm_head"], [("-", [4])]),
]


@pytest.mark.parametrize("ranks,columns,rows", RANK_TABLE_CASES)
def test_rank_table(ranks, columns, rows):
    assert rank_table(ranks) == (columns, rows)
