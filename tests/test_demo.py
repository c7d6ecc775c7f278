"""`adalora demo`'s bookkeeping (server/commands/demo.py): which --out it may write into, and when a second run reuses
an adapter the first trained (the same settings, the adapter still there) instead of training again. The demo itself
runs on the real models (`make demo`; its timing and output are in the closing notes of issue 20)."""

from __future__ import annotations

import json

import pytest

from adalora.recipe import REPORT_NAME, SpecError, TrainSpec, spec_record
from adalora.server.commands.demo import check_out, trained_before


def spec(out, steps: int = 30) -> TrainSpec:
    return TrainSpec(base_model="base", task="causal-lm", data="train.jsonl", out=str(out), total_steps=steps,
                     progress=False)


def write_run(out, record: dict, adapter: bool = True) -> None:
    out.mkdir(parents=True)
    (out / REPORT_NAME).write_text(json.dumps({"spec": record, "eval": {}}))
    if adapter:
        (out / "adapter.safetensors").write_bytes(b"x")


def test_a_run_with_the_same_settings_is_reused(tmp_path):
    out = tmp_path / "lm-adapters" / "dialog"
    write_run(out, spec_record(spec(out)))
    assert trained_before(spec(out)) == {"spec": spec_record(spec(out)), "eval": {}}


@pytest.mark.parametrize("case", ["other steps", "no adapter file", "no report", "bad report"])
def test_a_run_is_retrained_when_anything_differs(tmp_path, case):
    out = tmp_path / "dialog"
    if case == "other steps":
        write_run(out, spec_record(spec(out, steps=31)))
    elif case == "no adapter file":
        write_run(out, spec_record(spec(out)), adapter=False)
    elif case == "bad report":
        write_run(out, {})
        (out / REPORT_NAME).write_text("{not json")
    assert trained_before(spec(out)) is None


def test_the_spec_record_survives_json(tmp_path):
    record = spec_record(spec(tmp_path / "x"))
    assert json.loads(json.dumps(record)) == record and record["adapter"]["target_modules"] == []


@pytest.mark.parametrize("files, refused", [
    ([], None),
    (["adapters/trec6/adapter.safetensors", "lm-adapters/dialog/report.json", "lm-adapters/hamlet/ranks.png"], None),
    (["notes.txt"], "notes.txt"),
    (["adapters/mine/adapter.safetensors"], "adapters/mine"),
    (["lm-adapters/dialog/checkpoint.pt"], "lm-adapters/dialog/checkpoint.pt"),
    (["lm-adapters/trec6/report.json"], "lm-adapters/trec6"),  # a classifier id in the causal-LM store
])
def test_out_holds_only_what_a_demo_wrote(tmp_path, files, refused):
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    if refused is None:
        check_out(tmp_path)
    else:
        with pytest.raises(SpecError, match=refused):
            check_out(tmp_path)
