"""`adalora merge` through adalora.cli.main: outputs, provenance, and clean exit-2 errors writing nothing."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from adalora.adapter_file import load_adapter, save_adapter, tensors_sha256, to_tensors
from adalora.cli import main
from tests.conftest import tiny_llama
from tests.factories import random_adapter
from tests.test_merge import close, dense_sum, logits, other_base


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = tiny_llama()
    adapters = [random_adapter(base, 1), random_adapter(base, 2, init_r=6, lora_alpha=2.0, targets=("q_proj", "up_proj"))]
    paths = [str(save_adapter(a, root / f"a{i}").parent) for i, a in enumerate(adapters)]
    base.save_pretrained(root / "base", max_shard_size="20KB")
    save_adapter(other_base(adapters[1]), root / "foreign")
    return root, adapters, paths


def test_merge_writes_adapter_with_provenance(tmp_path, saved):
    _, adapters, paths = saved
    assert main(["merge", *paths, "--weights", "0.7", "0.3", "--method", "svd", "--out", str(tmp_path / "m")]) == 0
    merged = load_adapter(tmp_path / "m")
    for path in merged.shapes:
        assert close(merged.delta(path), dense_sum(adapters, (0.7, 0.3), path), 1e-5)
    info = merged.info["merge"]
    assert info["method"] == "svd" and info["params"]["weights"] == [0.7, 0.3]
    assert [e["sha256"] for e in info["inputs"]] == [tensors_sha256(to_tensors(a)) for a in adapters]


def test_merge_into_base_via_cli(tmp_path, saved):
    root, adapters, paths = saved
    args = ["merge", *paths, "--weights", "1", "1", "--method", "ties", "--density", "0.5", "--into-base",
            "--base-model", str(root / "base"), "--out", str(tmp_path / "full")]
    assert main(args) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["full"]  # --into-base writes the model folder only
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
    assert not close(logits(full), logits(tiny_llama()), 1e-3)


ERRORS = [  # (extra arguments, words in the message)
    (["--weights", "1"], "--weights has 1 value(s) for 2 adapter(s)"),
    (["--weights", "1", "1", "--method", "mean"], "unknown merge method 'mean'"),
    (["--weights", "1", "1", "--method", "ties", "--density", "0"], "--density 0.0 must be in (0, 1]"),
    (["--weights", "1", "1", "--method", "linear", "--budget", "10"], "does not use --budget"),
    (["--weights", "1", "1", "--into-base"], "--into-base needs --base-model DIR"),
    (["--weights", "1", "1", "--head-from", "3"], "--head-from 3 must be between 1 and 2"),
]


@pytest.mark.parametrize("extra,words", ERRORS)
def test_cli_errors_exit_2_and_write_nothing(tmp_path, saved, capsys, extra, words):
    _, _, paths = saved
    assert main(["merge", *paths, "--out", str(tmp_path / "m"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adalora merge: error: ") and words in err
    assert not (tmp_path / "m").exists()


def test_cli_mismatched_base_and_missing_input(tmp_path, saved, capsys):
    root, _, paths = saved
    assert main(["merge", paths[0], str(root / "foreign"), "--weights", "1", "1", "--out", str(tmp_path / "m")]) == 2
    assert "same base model" in capsys.readouterr().err
    assert main(["merge", paths[0], str(root / "nope"), "--weights", "1", "1", "--out", str(tmp_path / "m")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_merge_reads_peft_lora_input_with_base_model(tmp_path, saved, capsys):
    """A folder trained by PEFT merges with a native adapter; PEFT's own get_delta_weight is the reference."""
    from peft import LoraConfig, get_peft_model

    root, adapters, paths = saved
    torch.manual_seed(3)
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "down_proj"], init_lora_weights=False,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(tiny_llama(), config)
    peft_model.save_pretrained(tmp_path / "peft")
    peft_deltas = {name.removeprefix("base_model.model."): module.get_delta_weight("default").detach()
                   for name, module in peft_model.named_modules() if hasattr(module, "get_delta_weight")}

    args = ["merge", paths[0], str(tmp_path / "peft"), "--weights", "0.5", "2", "--out", str(tmp_path / "m")]
    assert main(args) == 2  # without the base folder a PEFT adapter has no base identity
    assert "pass --base-model DIR" in capsys.readouterr().err and not (tmp_path / "m").exists()

    assert main(args + ["--base-model", str(root / "base")]) == 0
    merged = load_adapter(tmp_path / "m")
    assert set(peft_deltas) <= set(merged.shapes)
    for path in merged.shapes:
        expected = 0.5 * adapters[0].delta(path) if path in adapters[0].shapes else 0.0
        expected = expected + 2 * peft_deltas[path] if path in peft_deltas else expected
        assert close(merged.delta(path), expected, 1e-5), path
