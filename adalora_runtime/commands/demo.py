"""`adalora demo`: prepare the assets if needed, then train a small AdaLoRA adapter on MiniLM + TREC-6."""

from __future__ import annotations

import argparse
from pathlib import Path

from adalora_runtime import assets
from adalora_runtime.data import DataError
from adalora_runtime.recipe import HEATMAP_NAME, REPORT_NAME, SpecError, TrainSpec, print_summary, run_train
from adalora_runtime.training import TrainingError

NAME = "demo"
HELP = "train a small AdaLoRA adapter on MiniLM + TREC-6 (a minute or two on a CPU) and show where the ranks went"
USER_ERRORS = (assets.AssetError, DataError, SpecError, TrainingError)
DEMO_OUTPUTS = {"adapter.safetensors", REPORT_NAME, HEATMAP_NAME}
"""Files a previous demo run leaves; an --out holding only these is replaced."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo; a previous demo there is replaced)")
    parser.add_argument("--cache", default=None, help="asset cache (default: $ADALORA_CACHE or ~/.cache/adalora)")
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")


def clear_previous(out: Path) -> None:
    """Remove a previous demo's outputs; refuse a folder holding anything else."""
    if not out.exists():
        return
    names = {p.name for p in out.iterdir()}
    if names - DEMO_OUTPUTS:
        raise SpecError(f"--out {out} holds files the demo did not write ({sorted(names - DEMO_OUTPUTS)}): choose another --out")
    for name in names:
        (out / name).unlink()


def demo_spec(out: Path, cache: str | None, steps: int, seed: int, device: str) -> TrainSpec:
    return TrainSpec(
        base_model=str(assets.model_path("minilm-l6", cache)), task="seq-cls",
        data=str(assets.dataset_path("trec6", "train", cache)),
        eval_data=str(assets.dataset_path("trec6", "eval", cache)), out=str(out),
        mode="adalora", init_r=8, target_r=4, lora_alpha=16.0, total_steps=steps, lr=3e-3,
        batch_size=32, max_length=64, seed=seed, device=device,
    )


def run(args: argparse.Namespace) -> int:
    assets.prepare(args.cache)
    out = Path(args.out)
    spec = demo_spec(out, args.cache, args.steps, args.seed, args.device)
    clear_previous(out)
    print(f"training AdaLoRA on MiniLM-L6 + TREC-6: {spec.total_steps} steps, init_r={spec.init_r} -> "
          f"target_r={spec.target_r} on every linear map of each block")
    report = run_train(spec)
    print_summary(report)
    print(f"eval accuracy on {report['data']['eval_examples']} held-out questions: {report['eval']['accuracy']:.3f}")
    print(f"{report['steps']} steps in {report['seconds']:.0f} s; adapter {report['adapter_params']} params "
          f"+ head {report['head_params']}")
    print(f"adapter: {report['adapter_file']}")
    print(f"rank heatmap: {report['heatmap']}  report: {out / REPORT_NAME}")
    return 0
