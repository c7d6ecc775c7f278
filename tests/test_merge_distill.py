"""distill: the model it fits is the reference models (input i alone = adapter i; the start = the linear merge),
its fit moves toward a known optimum, the file it writes is the reweighted sum, and bad options are refused."""

import copy
import dataclasses
import json

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from adalora.adapter_file import load_adapter, save_adapter
from adalora.cli import main
from adalora.inject import attach_adapter
from adalora.tools.merge import MergeError, MergeParams, merge_adapters
from adalora.tools.merge.distill import FitConfig, MergedModel, fit_module_weights, reweighted
from tests.factories import random_adapter
from tests.test_merge import close
from tests.test_train_cli import cls_rows, save_tiny_model

TEXTS = [r["text"] for r in cls_rows(24)]


def _inputs(folder, kind):
    """Two adapters of the saved tiny base; for BERT seq-cls with 2 and 3 labels (heads of different shapes)."""
    if kind == "bert-features":
        base = AutoModel.from_pretrained(folder).eval()
        return [random_adapter(base, 1, targets=("query", "value"), task_type="feature-extraction"),
                random_adapter(base, 2, init_r=3, targets=("query", "dense"), task_type="feature-extraction")]
    if kind == "bert":
        base = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        three = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3, ignore_mismatched_sizes=True).eval()
        return [random_adapter(three, 2, init_r=3, lora_alpha=3.0, targets=("query", "key"), task_type="seq-cls",
                               labels=["u", "v", "w"]),  # first: its head is not the saved base's (2 labels)
                random_adapter(base, 1, targets=("query", "value", "dense"), task_type="seq-cls", labels=["x", "y"])]
    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    return [random_adapter(base, 1), random_adapter(base, 2, init_r=6, lora_alpha=2.0, targets=("q_proj", "up_proj"))]


@pytest.fixture(scope="module", params=["bert", "llama", "bert-features"])
def case(request, tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp(request.param), request.param.split("-")[0])
    return folder, _inputs(folder, request.param)


def reference_output(folder, adapter, batch):
    """A fresh base with `adapter` attached (its own head): what distill must reproduce."""
    if adapter.task_type == "seq-cls":
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=len(adapter.labels),
                                                                   ignore_mismatched_sizes=True).eval()
    elif adapter.task_type == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
    else:
        model = AutoModel.from_pretrained(folder).eval()
    attach_adapter(model, adapter)
    with torch.no_grad():
        return output(model(**batch))


def output(result):
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def batch_of(folder, texts=TEXTS[:4]):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer(texts, return_tensors="pt", padding=True)


def test_teacher_is_each_input_alone_with_its_own_head(case):
    folder, adapters = case
    merged = MergedModel(adapters, [0.4, 0.9], folder)
    batch = batch_of(folder)
    for i, adapter in enumerate(adapters):
        with torch.no_grad():
            got = output(merged.forward(i, batch, teacher=True))
        assert close(got, reference_output(folder, adapter, batch), 1e-5)


def test_start_is_the_linear_merge_with_each_inputs_head(case):
    folder, adapters = case
    weights = [0.4, 0.9]
    merged = MergedModel(adapters, weights, folder)
    linear = merge_adapters(adapters, "linear", MergeParams(weights=tuple(weights)))
    batch = batch_of(folder)
    for i, adapter in enumerate(adapters):
        with torch.no_grad():
            got = output(merged.forward(i, batch))
        want = reference_output(folder, dataclasses.replace(linear, head=adapter.head, labels=adapter.labels), batch)
        assert close(got, want, 1e-5)


def test_reweighted_inputs_merge_to_the_per_module_weighted_sum(case):
    _, adapters = case
    gen = torch.Generator().manual_seed(0)
    paths = {p for a in adapters for p in a.layers}
    weights = {p: [float(w) for w in torch.randn(2, generator=gen)] for p in paths}
    merged = merge_adapters(reweighted(adapters, weights), "linear", MergeParams(weights=(1.0, 1.0)))
    for path in paths:
        want = sum(w * a.delta(path) for w, a in zip(weights[path], adapters) if path in a.layers)
        assert close(merged.delta(path), want, 1e-5)


def total_divergence(merged, weights, folder):
    """Summed divergence of every input over all TEXTS, with module m's weights set to weights[m]."""
    with torch.no_grad():
        for path, coef in merged.coefs.items():
            coef.copy_(torch.tensor(weights[path]))
        return sum(float(merged.divergence(i, batch_of(folder, TEXTS))) for i in range(len(merged.adapters)))


@pytest.mark.parametrize("n", [1, 2])
def test_the_fit_lowers_the_divergence(case, n):
    """With one input the least divergence is 0, at weight 1: the fit from 0.2 gets most of the way there; with two
    (different teachers on the same rows) the least is above 0, and the fit still lowers it."""
    folder, adapters = case
    start, inputs = [0.2] * n, adapters[-n:]  # the last input of each case changes its outputs the most
    fitted = fit_module_weights(inputs, start, folder, [TEXTS] * n, FitConfig(steps=40, lr=2e-2, batch_size=8))
    merged = MergedModel(inputs, start, folder)
    before = total_divergence(merged, {p: start for p in merged.coefs}, folder)
    after = total_divergence(merged, fitted, folder)
    assert after < (0.2 if n == 1 else 0.95) * before


def test_fit_is_deterministic_per_seed(case):
    folder, adapters = case
    config = FitConfig(steps=3, batch_size=4, seed=1)
    assert fit_module_weights(adapters, [0.5, 0.5], folder, [TEXTS, TEXTS], config) == \
        fit_module_weights(adapters, [0.5, 0.5], folder, [TEXTS, TEXTS], config)


@pytest.fixture(scope="module")
def saved(case, tmp_path_factory):
    folder, adapters = case
    root = tmp_path_factory.mktemp("distill")
    paths = [str(save_adapter(a, root / f"a{i}").parent) for i, a in enumerate(adapters)]
    data = []
    for i, texts in enumerate([TEXTS[:12], TEXTS[12:]]):
        (root / f"d{i}.jsonl").write_text("".join(json.dumps({"text": t, "label": "ignored"}) + "\n" for t in texts))
        data.append(str(root / f"d{i}.jsonl"))
    return folder, adapters, paths, data


def test_cli_writes_the_fitted_weighted_sum_with_its_weights(tmp_path, saved):
    folder, adapters, paths, data = saved
    out = tmp_path / "m"
    assert main(["merge", *paths, "--method", "distill", "--weights", "0.5", "0.5", "--data", *data,
                 "--base-model", str(folder), "--steps", "3", "--out", str(out)]) == 0
    merged = load_adapter(out)
    info = merged.info["merge"]
    assert info["method"] == "distill" and info["params"]["steps"] == 3 and info["params"]["data"] == data
    fitted = info["fitted_weights"]
    assert set(fitted) == {p for a in adapters for p in a.layers}
    assert any(abs(w - 0.5) > 1e-4 for ws in fitted.values() for w in ws)  # the fit moved the weights
    for path in merged.shapes:
        if path not in fitted:  # rank 0 in every input
            assert path not in merged.layers
            continue
        want = sum(w * a.delta(path) for w, a in zip(fitted[path], adapters) if path in a.layers)
        assert close(merged.delta(path), want, 1e-4)


def test_budget_recompresses_the_fitted_sum(saved):
    folder, adapters, _, data = saved
    exact = merge_adapters(adapters, "distill", MergeParams(weights=(0.5, 0.5), data=tuple(data), steps=2),
                           base_model_dir=folder)
    small = merge_adapters(adapters, "distill", MergeParams(weights=(0.5, 0.5), data=tuple(data), steps=2,
                                                            budget=exact.num_params() // 2), base_model_dir=folder)
    assert small.num_params() <= exact.num_params() // 2 < exact.num_params()
    assert small.info["merge"]["fitted_weights"] == exact.info["merge"]["fitted_weights"]


ERRORS = [  # (arguments after the adapters, words in the message)
    (["--method", "distill", "--weights", "1", "1", "--base-model", "{base}"], "method 'distill' needs --data"),
    (["--method", "distill", "--weights", "1", "1", "--data", "{d0}", "{d1}"], "needs --base-model DIR"),
    (["--method", "distill", "--weights", "1", "1", "--data", "{d0}", "--base-model", "{base}"],
     "--data has 1 file(s) for 2 adapter(s)"),
    (["--method", "distill", "--weights", "1", "1", "--data", "{d0}", "{missing}", "--base-model", "{base}"],
     "no such data file"),
    (["--method", "distill", "--weights", "1", "1", "--data", "{d0}", "{d1}", "--steps", "0", "--base-model",
      "{base}"], "--steps 0 must be a positive integer"),
    (["--method", "linear", "--weights", "1", "1", "--data", "{d0}", "{d1}"], "does not use --data"),
    (["--method", "distill", "--weights", "1", "1", "--data", "{d0}", "{d1}", "--density", "0.5", "--base-model",
      "{base}"], "does not use --density"),
]


@pytest.mark.parametrize("extra,words", ERRORS)
def test_cli_errors_exit_2_and_write_nothing(tmp_path, saved, capsys, extra, words):
    folder, _, paths, data = saved
    values = {"base": str(folder), "d0": data[0], "d1": data[1], "missing": str(tmp_path / "none.jsonl")}
    assert main(["merge", *paths, "--out", str(tmp_path / "m"), *[a.format(**values) for a in extra]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adalora merge: error: ") and words in err
    assert not (tmp_path / "m").exists()


def test_a_base_that_cannot_load_is_named(tmp_path, saved):
    _, adapters, _, _ = saved
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MergeError, match="--base-model .* cannot load"):
        MergedModel(copy.deepcopy(adapters), [1.0, 1.0], tmp_path)
