"""`adalora demo`: prepare the assets if needed, train small AdaLoRA adapters on MiniLM for TREC-6, SMS spam
and RT sentiment into one adapter store, then serve all three from one base over gRPC and classify with each."""

from __future__ import annotations

import argparse
from pathlib import Path

from adalora import assets
from adalora.data import DataError
from adalora.config import AdapterShape
from adalora.recipe import (HEATMAP_NAME, REPORT_NAME, SpecError, TrainSpec, print_summary, resolve_device,
                                    run_train)
from adalora.training import TrainingError

NAME = "demo"
HELP = ("train three small AdaLoRA adapters on MiniLM (a few minutes on a CPU), show where the ranks went, "
        "then serve them together over gRPC")
USER_ERRORS = (assets.AssetError, DataError, SpecError, TrainingError)
DEMO_OUTPUTS = {"adapter.safetensors", REPORT_NAME, HEATMAP_NAME}
"""Files a previous demo run leaves in each adapter folder; an --out holding only these is replaced."""
TASKS = {"trec6": 1.0, "sms-spam": 0.5, "rt-sentiment": 0.5}
"""Adapter id (= data set) -> its share of --steps."""
EXAMPLES = {
    "trec6": ("Who wrote the novel Moby Dick ?", "How far is the moon from the earth ?"),
    "sms-spam": ("WINNER!! You have won a free prize, text CLAIM to 80086 now", "Are we still on for lunch at noon?"),
    "rt-sentiment": ("A warm, funny and beautifully acted film.", "Tedious, predictable and far too long."),
}
"""What the served adapters are asked, concurrently, after training."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo; a previous demo there is replaced)")
    parser.add_argument("--cache", default=None, help="asset cache (default: $ADALORA_CACHE or ~/.cache/adalora)")
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")


def clear_previous(out: Path) -> None:
    """Remove a previous demo's outputs (out/adapters/<task>/...); refuse a folder holding anything else."""
    if not out.exists():
        return
    store = out / "adapters"
    strays = sorted({p.name for p in out.iterdir()} - {"adapters"})
    folders = sorted(store.iterdir()) if store.is_dir() else []
    strays += [f"adapters/{f.name}" for f in folders if f.name not in TASKS or not f.is_dir()]
    strays += [f"adapters/{f.name}/{n.name}" for f in folders if f.name in TASKS and f.is_dir()
               for n in f.iterdir() if n.name not in DEMO_OUTPUTS]
    if strays:
        raise SpecError(f"--out {out} holds files the demo did not write ({strays}): choose another --out")
    for folder in folders:
        for name in folder.iterdir():
            name.unlink()
        folder.rmdir()


def demo_spec(out: Path, cache: str | None, task: str, steps: int, seed: int, device: str) -> TrainSpec:
    return TrainSpec(
        base_model=str(assets.model_path("minilm-l6", cache)), task="seq-cls",
        data=str(assets.dataset_path(task, "train", cache)),
        eval_data=str(assets.dataset_path(task, "eval", cache)), out=str(out),
        adapter=AdapterShape(mode="adalora", init_r=8, target_r=4, lora_alpha=16.0), total_steps=steps, lr=3e-3,
        batch_size=32, max_length=64, seed=seed, device=device,
    )


def run(args: argparse.Namespace) -> int:
    from adalora.server.demo import serve_and_classify  # the serving half lives with the server

    assets.prepare(args.cache)
    out = Path(args.out)
    clear_previous(out)
    reports = {}
    for task, share in TASKS.items():
        spec = demo_spec(out / "adapters" / task, args.cache, task, max(2, round(args.steps * share)), args.seed,
                         args.device)
        print(f"training AdaLoRA on MiniLM-L6 + {task}: {spec.total_steps} steps, init_r={spec.adapter.init_r} -> "
              f"target_r={spec.adapter.target_r} on every linear map of each block")
        reports[task] = report = run_train(spec)
        if task == "trec6":
            print_summary(report)
        print(f"{task}: eval accuracy {report['eval']['accuracy']:.3f} on {report['data']['eval_examples']} held-out "
              f"rows; {report['steps']} steps in {report['seconds']:.0f} s; adapter {report['adapter_params']} params "
              f"+ head {report['head_params']}; {report['adapter_file']}")
    print(f"rank heatmap: {reports['trec6']['heatmap']}")
    device = str(resolve_device(args.device))
    serve_and_classify(str(assets.model_path("minilm-l6", args.cache)), str(out / "adapters"), EXAMPLES, device)
    return 0
