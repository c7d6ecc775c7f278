"""Data loading cases, batches as a pure sharded function of the step, evaluation vs a naive reference."""

import math

import pytest
import torch

from adalora.data import (
    DataError, Example, IGNORE_INDEX, batch_indices, evaluate, label_set, load_examples, make_batches,
    steps_per_epoch,
)
from tests.conftest import tiny_bert, tiny_llama
from tests.test_train_cli import make_tokenizer

LOAD_CASES = [
    # (name, file name, content, task, expected examples)
    ("jsonl-cls", "d.jsonl", '{"text": "good", "label": "pos"}\n\n{"text": "bad", "label": 0}\n', "seq-cls",
     [Example("good", "pos"), Example("bad", "0")]),
    ("csv-cls", "d.csv", "text,label\ngood film,pos\n\"bad, awful\",neg\n", "seq-cls",
     [Example("good film", "pos"), Example("bad, awful", "neg")]),
    ("jsonl-lm", "d.jsonl", '{"text": "a b"}\n{"prompt": "q", "completion": "a"}\n', "causal-lm",
     [Example("a b"), Example("q", completion="a")]),
    ("csv-lm", "d.csv", "prompt,completion\nq,a\n", "causal-lm", [Example("q", completion="a")]),
]


@pytest.mark.parametrize("name,fname,content,task,expected", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_load_examples(tmp_path, name, fname, content, task, expected):
    path = tmp_path / fname
    path.write_text(content)
    assert load_examples(path, task) == expected


ERROR_CASES = [
    # (name, file name, content or None for missing, task, message fragment)
    ("missing", "d.jsonl", None, "seq-cls", "no such data file"),
    ("empty", "d.jsonl", "", "seq-cls", "empty"),
    ("empty-csv", "d.csv", "text,label\n", "seq-cls", "empty"),
    ("malformed", "d.jsonl", '{"text": "a", "label": "x"}\n{"text": \n', "seq-cls", "d.jsonl:2: malformed JSON"),
    ("not-object", "d.jsonl", "[1, 2]\n", "seq-cls", "d.jsonl:1: expected a JSON object"),
    ("missing-label", "d.jsonl", '{"text": "a"}\n', "seq-cls", "d.jsonl:1: missing field 'label'"),
    ("missing-text", "d.csv", "label\npos\n", "seq-cls", "d.csv:2: missing field 'text'"),
    ("float-label", "d.jsonl", '{"text": "a", "label": 1.5}\n', "seq-cls", "label must be a string"),
    ("list-label", "d.jsonl", '{"text": "a", "label": ["x"]}\n', "seq-cls", "label must be a string"),
    ("bool-label", "d.jsonl", '{"text": "a", "label": true}\n', "seq-cls", "label must be a string"),
    ("int-text", "d.jsonl", '{"text": 3, "label": "x"}\n', "seq-cls", "field 'text' must be a string"),
    ("prompt-no-completion", "d.jsonl", '{"prompt": "q"}\n', "causal-lm", "missing field 'completion'"),
    ("extra-csv-values", "d.csv", "text,label\na,b,c\n", "seq-cls", "d.csv:2: more values"),
    ("suffix", "d.txt", "hello\n", "causal-lm", "unsupported data file type"),
    ("task", "d.jsonl", '{"text": "a"}\n', "regression", "task='regression'"),
]


@pytest.mark.parametrize("name,fname,content,task,needle", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_load_errors_name_file_and_line(tmp_path, name, fname, content, task, needle):
    path = tmp_path / fname
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as e:
        load_examples(path, task)
    assert needle in str(e.value)
    if name != "task":
        assert str(path.name) in str(e.value)


def test_label_set_sorted_unique():
    assert label_set([Example("a", "b"), Example("c", "a"), Example("d", "b")]) == ["a", "b"]


@pytest.mark.parametrize("n,bs,world", [(10, 3, 1), (10, 2, 2), (7, 4, 2), (3, 4, 1), (16, 4, 2)])
def test_batch_indices_pure_sharded_and_cover_each_epoch(n, bs, world):
    per_epoch = steps_per_epoch(n, bs, world)
    for epoch in range(2):
        seen = []
        for step in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            shards = [batch_indices(step, n, bs, seed=3, rank=r, world_size=world) for r in range(world)]
            assert shards == [batch_indices(step, n, bs, seed=3, rank=r, world_size=world) for r in range(world)]
            assert all(len(s) == bs for s in shards)
            flat = [i for s in shards for i in s]
            if n >= bs * world:  # ranks see disjoint rows within a step
                assert len(set(flat)) == len(flat)
            seen += flat
        assert set(seen) == set(range(n))  # every row once per epoch (the last batch wraps)
    assert batch_indices(0, n, bs, seed=3) != batch_indices(0, n, bs, seed=4) or n <= 1


def test_make_batches_seq_cls():
    tok = make_tokenizer("bert")
    examples = [Example("good movie", "pos"), Example("bad very bad film", "neg"), Example("fun", "pos")]
    batches = make_batches(examples, tok, "seq-cls", batch_size=3, seed=0)
    b = batches(0)
    assert b["input_ids"].shape == b["attention_mask"].shape and b["labels"].shape == (3,)
    texts = {len(e.text.split()): ["neg", "pos"].index(e.label) for e in examples}
    for row in range(3):
        assert texts[int(b["attention_mask"][row].sum())] == int(b["labels"][row])  # label follows its row
    torch.testing.assert_close(batches(5)["input_ids"], make_batches(examples, tok, "seq-cls", 3, 0)(5)["input_ids"])


def test_make_batches_causal_lm_masks_prompt_and_padding():
    tok = make_tokenizer("llama")
    examples = [Example("what is the movie", completion="good"), Example("the plot is fun")]
    b = make_batches(examples, tok, "causal-lm", batch_size=2, seed=0)(0)
    eos = tok.eos_token_id
    for ids, mask, labels in zip(b["input_ids"], b["attention_mask"], b["labels"]):
        n = int(mask.sum())
        assert int(ids[n - 1]) == eos
        assert (labels[n:] == IGNORE_INDEX).all() and (ids[n:] == eos).all()  # eos pads (no pad token)
        if n == 5 + 1:  # prompt-completion row: only "good" + eos are targets
            assert labels[:n].tolist() == [IGNORE_INDEX] * 4 + ids[4:n].tolist()
        else:
            assert labels[:n].tolist() == ids[:n].tolist()


def test_make_batches_unknown_label_names_it_and_the_row():
    tok = make_tokenizer("bert")
    with pytest.raises(DataError, match=r"row 2 has label 'maybe'"):
        make_batches([Example("a", "pos"), Example("b", "maybe")], tok, "seq-cls", 2, 0, labels=["neg", "pos"])


def test_evaluate_matches_naive_reference():
    tok = make_tokenizer("bert")
    examples = [Example(t, lab) for t, lab in [("good movie", "a"), ("bad", "b"), ("fun plot", "c"), ("awful", "a")]]
    model = tiny_bert(num_labels=3)
    got = evaluate(model, examples, tok, "seq-cls", labels=["a", "b", "c"], batch_size=3)
    correct = 0
    for e in examples:
        logits = model(**tok(e.text, return_tensors="pt")).logits
        correct += int(logits.argmax(-1)) == ["a", "b", "c"].index(e.label)
    assert got["accuracy"] == pytest.approx(correct / 4)

    tok = make_tokenizer("llama")
    lm = [Example("the movie was good"), Example("what is it", completion="fun")]
    model = tiny_llama()
    got = evaluate(model, lm, tok, "causal-lm", batch_size=2)
    nll, count = 0.0, 0
    for e in lm:  # one example at a time, no padding
        prompt = tok(e.text)["input_ids"]
        ids = prompt + (tok(e.completion, add_special_tokens=False)["input_ids"] if e.completion else []) + [tok.eos_token_id]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        first = len(prompt) if e.completion else 1
        for t in range(first, len(ids)):
            nll -= float(torch.log_softmax(logits[t - 1], -1)[ids[t]])
            count += 1
    assert got["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
