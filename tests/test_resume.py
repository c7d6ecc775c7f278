"""A run interrupted after a checkpoint and resumed in a fresh process ends exactly where an uninterrupted one does."""

import json
import subprocess
import sys

import pytest
import torch

from adalora import recipe
from adalora.adapter_file import load_adapter
from adalora.config import AdapterShape
from adalora.recipe import TrainSpec, run_train
from adalora.training import CHECKPOINT_NAME
from tests.test_train_cli import cls_rows, save_tiny_model, write_jsonl

N = 16


def _spec(tmp_path, base, out, **kw) -> TrainSpec:
    return TrainSpec(base_model=str(base), task="seq-cls", data=str(tmp_path / "train.jsonl"), out=str(out),
                     adapter=AdapterShape(init_r=4, target_r=2), total_steps=N, tinit=2, tfinal=4, deltaT=2, batch_size=4, lr=1e-2,
                     device="cpu", progress=False, **kw)


def test_resume_matches_uninterrupted(tmp_path, monkeypatch):
    base = save_tiny_model(tmp_path / "model", "bert")
    write_jsonl(tmp_path / "train.jsonl", cls_rows(20))
    full = run_train(_spec(tmp_path, base, tmp_path / "full"))

    real_train = recipe.train

    def interrupted(*args, on_step=None, **kw):
        def stop(log, allocator):
            on_step(log, allocator)
            if log.step == N // 2:  # the step after the checkpoint at N/2 is lost, as in a real crash
                raise KeyboardInterrupt

        return real_train(*args, on_step=stop, **kw)

    monkeypatch.setattr(recipe, "train", interrupted)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_train(_spec(tmp_path, base, out, checkpoint_every=N // 2))
    assert sorted(p.name for p in out.iterdir()) == [CHECKPOINT_NAME]  # Ctrl-C keeps the checkpoint only
    assert torch.load(out / CHECKPOINT_NAME, weights_only=True)["next_step"] == N // 2

    cmd = [sys.executable, "-m", "adalora.cli", "train", "--base-model", str(base), "--task", "seq-cls",
           "--data", str(tmp_path / "train.jsonl"), "--out", str(out), "--init-r", "4", "--target-r", "2",
           "--total-steps", str(N), "--tinit", "2", "--tfinal", "4", "--deltaT", "2", "--batch-size", "4",
           "--lr", "1e-2", "--device", "cpu", "--no-progress", "--resume"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    resumed = json.loads((out / "report.json").read_text())
    assert resumed["steps_run"] == N - N // 2
    assert resumed["ranks"] == full["ranks"]
    assert 0 < sum(full["ranks"].values()) < 4 * len(full["ranks"])

    a, b = load_adapter(tmp_path / "full"), load_adapter(out)
    assert a.layers.keys() == b.layers.keys() and a.head.keys() == b.head.keys()
    for path in a.layers:
        for name in ("P", "lam", "Q"):
            torch.testing.assert_close(getattr(a.layers[path], name), getattr(b.layers[path], name), rtol=0, atol=0)
    for name in a.head:
        torch.testing.assert_close(a.head[name], b.head[name], rtol=0, atol=0)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    base = save_tiny_model(tmp_path / "model", "bert")
    write_jsonl(tmp_path / "train.jsonl", cls_rows(8))
    with pytest.raises(recipe.SpecError, match="no checkpoint"):
        run_train(_spec(tmp_path, base, tmp_path / "out", resume=True))
    assert not (tmp_path / "out").exists()
