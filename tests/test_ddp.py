"""run_train under torchrun (2 CPU ranks, gloo): replicas stay identical, data is sharded, only rank 0 writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.test_train_cli import cls_rows, save_tiny_model, write_jsonl

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_ddp_two_ranks_identical(tmp_path):
    base = save_tiny_model(tmp_path / "model", "bert")
    data = write_jsonl(tmp_path / "train.jsonl", cls_rows(32))
    out, dump = tmp_path / "out", tmp_path / "dump"
    dump.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(base), str(data), str(out), str(dump)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]

    r0, r1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2 and r0["is_distributed"]
    assert not torch.equal(r0["first_batch"], r1["first_batch"])  # each rank trains on its own shard
    assert {p: m.tolist() for p, m in r0["masks"].items()} == {p: m.tolist() for p, m in r1["masks"].items()}
    kept = sum(int(m.sum()) for m in r0["masks"].values())
    assert 0 < kept < 4 * len(r0["masks"])
    for a, b in zip(r0["params"], r1["params"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    report = json.loads((out / "report.json").read_text())  # written once, by rank 0
    assert report["world_size"] == 2 and sum(report["ranks"].values()) == kept
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "ranks.png", "report.json"]
