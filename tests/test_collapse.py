"""Collapsed-run warnings (adalora.collapse): the rules as a table, then `adalora train` on a tiny BERT, where a run
whose loss cannot move (lr 1e-7) warns on stderr and in report.json and a healthy run (the default lr) does not."""

from __future__ import annotations

import json

import pytest

from adalora.cli import main
from adalora.collapse import DEFAULT_LR, cause, diagnose, loss_moved, majority_rate
from tests.test_train_cli import bert_dir, cls_rows, write_jsonl  # noqa: F401 - bert_dir is a fixture

FALLING = [2.0 - 0.1 * i for i in range(20)]
FLAT = [0.69 + 0.001 * (i % 3) for i in range(20)]


@pytest.mark.parametrize("labels, rate", [([], None), (["a"], 1.0), (["a", "b", "a", "a"], 0.75),
                                          (["x", "y"], 0.5)])
def test_majority_rate(labels, rate):
    assert majority_rate(labels) == rate


@pytest.mark.parametrize("losses, moved", [(FALLING, True), (FLAT, False), ([1.0, 0.5, 0.2], None),
                                           ([1.0] * 10 + [0.96] * 10, False), ([1.0] * 10 + [0.94] * 10, True),
                                           ([1.0] * 9 + [float("nan")], False)])
def test_loss_moved(losses, moved):
    assert loss_moved(losses) is moved


@pytest.mark.parametrize("mode, lr, says", [
    ("adalora", 1e-3, "too low for adalora (lambda starts at 0"),
    ("lora", 1e-4, "too low for lora;"),
    ("lora", 1e-2, "too high for lora"),
    ("adalora", 5e-2, "too high for adalora"),
    ("adalora", 1e-2, "too short or the task too hard"),
])
def test_cause_names_the_lr_and_the_default(mode, lr, says):
    advice = cause(mode, lr)
    assert says in advice and f"try --lr {DEFAULT_LR[mode]:g}" in advice


@pytest.mark.parametrize("losses, accuracy, labels, fires", [
    (FALLING, 0.95, ["a", "b"] * 10, []),                                  # healthy
    (FLAT, 0.95, ["a", "b"] * 10, ["loss did not move"]),
    (FALLING, 0.75, ["a", "a", "a", "b"] * 5, ["majority-class rate 0.7500"]),  # learned nothing useful
    (FALLING, 0.70, ["a", "a", "a", "b"] * 5, ["majority-class rate"]),          # below it
    (FLAT, 0.5, ["a", "b"] * 10, ["loss did not move", "majority-class rate 0.5000"]),
    (FLAT, None, [], ["loss did not move"]),                               # causal-lm: no accuracy
    (FALLING, None, [], []),
    (FALLING, 1.0, ["a"] * 20, []),                                        # one-class eval labels: not judged
])
def test_diagnose(losses, accuracy, labels, fires):
    warnings = diagnose("adalora", 1e-3, losses, accuracy, labels)
    if not fires:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warnings[0].startswith("this run looks collapsed")
        assert all(f in warnings[0] for f in fires) and "try --lr 0.01" in warnings[0]


def _train(bert_dir, tmp_path, name: str, lr: list[str]) -> dict:
    rows = cls_rows(64)
    data, evald = write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(tmp_path / "eval.jsonl", cls_rows(32, 1))
    out = tmp_path / name
    assert main(["train", "--no-progress", "--device", "cpu", "--base-model", str(bert_dir), "--task", "seq-cls",
                 "--data", str(data), "--eval-data", str(evald), "--out", str(out), "--init-r", "4",
                 "--total-steps", "40", "--batch-size", "16", *lr]) == 0
    return json.loads((out / "report.json").read_text())


def test_a_collapsed_run_warns_and_a_healthy_one_does_not(bert_dir, tmp_path, capsys):  # noqa: F811
    collapsed = _train(bert_dir, tmp_path, "collapsed", ["--lr", "1e-7"])
    err = capsys.readouterr().err
    assert collapsed["warnings"] and "loss did not move" in collapsed["warnings"][0]
    assert "warning: this run looks collapsed" in err and "too low for adalora" in err

    healthy = _train(bert_dir, tmp_path, "healthy", [])  # the default lr: 1e-2 for adalora
    err = capsys.readouterr().err
    assert healthy["train_args"]["lr"] == DEFAULT_LR["adalora"]
    assert healthy["eval"]["accuracy"] > 0.75, healthy["eval"]  # it learned the task
    assert healthy["warnings"] == [] and "warning" not in err
