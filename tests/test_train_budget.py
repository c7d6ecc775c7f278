"""benchmarks/train_budget.py: the budgets' parameter counts and AdaLoRA's init_r by hand, the lr choice from a
journal (no training), and both quality benchmarks' --quick commands end to end."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import train_budget as tb
from tests.conftest import tiny_bert

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dims(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    tiny_bert().save_pretrained(folder)
    return tb.module_dims(str(folder))


# tiny BERT: 2 layers; attention maps 32 -> 32 (4 a layer), intermediate 32 -> 48, output 48 -> 32
PARAM_CASES = [  # (budget, LoRA params = r * (in + out) summed, AdaLoRA init_r)
    ("r1-attn", 1 * 4 * 64 * 2, 2),         # 512: mean rank 512 / 844 -> 1.5 x 0.61 -> 2 (the floor)
    ("r1", 1 * (4 * 64 + 2 * 80) * 2, 2),   # 832 / 844 -> 1.48 -> 2
    ("r2", 2 * (4 * 64 + 2 * 80) * 2, 3),   # 1664 / 844 -> 2.96 -> 3
    ("r8", 8 * (4 * 64 + 2 * 80) * 2, 12),  # 6656 / 844 -> 11.83 -> 12
]


@pytest.mark.parametrize("budget,params,init_r", PARAM_CASES)
def test_budget_params_and_init_r(tiny_dims, budget, params, init_r):
    model_type, dims = tiny_dims
    assert model_type == "bert" and sum(i + o + 1 for i, o in dims.values()) == 844
    assert tb.lora_param_count(tb.BUDGETS[budget], model_type, dims) == params
    assert tb.adalora_init_r(params, dims) == init_r


LO, HI = 1e-3, 1e-2


def sweep_args(**kw):
    base = dict(budgets=["r1", "r2"], seeds=2, lrs=[LO, HI], grid_datasets=None, jobs=1, report_only=False)
    return argparse.Namespace(**{**base, **kw})


def journal_with(path, accuracies):
    """accuracies: {(dataset, budget, method, lr, seed): accuracy} written as finished runs."""
    rows = [{"key": tb.Run(*k).key, "dataset": k[0], "budget": k[1], "method": k[2], "lr": k[3], "seed": k[4],
             "accuracy": acc, "params": 100, "steps": 10, "seconds": 1.0} for k, acc in accuracies.items()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_each_cell_takes_its_own_best_lr_then_runs_the_seeds(tmp_path):
    lo, hi = LO, HI
    acc = {}
    for b in ("r1", "r2"):
        for m in ("lora", "adalora"):
            best = lo if (b, m) == ("r1", "lora") else hi
            acc[("a", b, m, lo, 0)] = 0.8 if best == lo else 0.7
            acc[("a", b, m, hi, 0)] = 0.7 if best == lo else 0.8
            acc[("a", b, m, best, 1)] = 0.9
    journal_with(tmp_path / "j.jsonl", acc)
    summary = tb.sweep(sweep_args(), {"a": ("t", "e", None)}, tmp_path / "j.jsonl")
    assert summary["a|r1|lora"]["best_lr"] == lo and summary["a|r2|lora"]["best_lr"] == hi
    assert summary["a|r1|adalora"]["best_lr"] == hi
    assert summary["a|r1|lora"]["accuracies"] == [0.8, 0.9]
    assert summary["a|r1|lora"]["mean"] == pytest.approx(0.85)
    assert tb.gaps(summary, ["a"], ["r1", "r2"]) == {"r1": pytest.approx(0.0), "r2": pytest.approx(0.0)}


def test_a_data_set_off_the_grid_takes_the_lr_best_summed_over_the_grid_sets(tmp_path):
    lo, hi = LO, HI
    acc = {}
    for m in ("lora", "adalora"):  # grid sets disagree; hi wins on the sum (0.6 + 0.9 > 0.7 + 0.7)
        acc.update({("g1", "r1", m, lo, 0): 0.7, ("g1", "r1", m, hi, 0): 0.6,
                    ("g2", "r1", m, lo, 0): 0.7, ("g2", "r1", m, hi, 0): 0.9,
                    ("x", "r1", m, hi, 0): 0.5})
    journal_with(tmp_path / "j.jsonl", acc)
    args = sweep_args(budgets=["r1"], seeds=1, grid_datasets=["g1", "g2"])
    summary = tb.sweep(args, {d: ("t", "e", None) for d in ("g1", "g2", "x")}, tmp_path / "j.jsonl")
    assert summary["x|r1|adalora"]["best_lr"] == hi and summary["x|r1|adalora"]["accuracies"] == [0.5]
    assert summary["g1|r1|lora"]["best_lr"] == lo  # a grid set keeps its own best


def test_report_only_trains_nothing_and_tables_what_ran(tmp_path):
    """Seed 1 never ran and r2 not at all: nothing is trained (the files do not exist), r1's cells show one seed."""
    journal_with(tmp_path / "j.jsonl", {("a", "r1", "lora", LO, 0): 0.8, ("a", "r1", "lora", HI, 0): 0.7,
                                        ("a", "r1", "adalora", LO, 0): 0.6, ("a", "r1", "adalora", HI, 0): 0.9})
    summary = tb.sweep(sweep_args(report_only=True), {"a": ("missing", "missing", None)}, tmp_path / "j.jsonl")
    assert sorted(summary) == ["a|r1|adalora", "a|r1|lora"]
    assert summary["a|r1|adalora"]["accuracies"] == [0.9]
    assert tb.gaps(summary, ["a"], ["r1", "r2"]) == {"r1": pytest.approx(10.0)}  # r2 has no cells: no gap
    assert "80.0 ± 0.0 (1 seed)" in tb.table(summary, ["a"], ["r1", "r2"])


def test_a_variant_must_be_named():
    with pytest.raises(SystemExit):
        tb.parse_args(["--orth-reg-weight", "0.1"])
    assert tb.parse_args(["--orth-reg-weight", "0.1", "--name", "x"]).variant


@pytest.mark.parametrize("command", [
    ["benchmarks/train_budget.py", "--quick", "--budgets", "r1-attn", "r2", "--seeds", "1", "--no-plot"],
    ["benchmarks/merge_quality.py", "--quick"],
])
def test_quick_benchmarks_run(command):
    done = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| average |" in done.stdout or "two smallest budgets" in done.stdout
