"""`adalora demo`: prepare the assets if needed, train small AdaLoRA adapters (MiniLM classifiers for TREC-6, SMS spam
and RT sentiment; SmolLM2 causal-LM adapters for movie-dialog replies and Hamlet's style), then serve each base with
its adapters from one process: classification over gRPC, generation for every adapter, the base and a weighted mix
in one batch. A second run reuses the adapters the first trained."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from adalora import assets
from adalora.config import AdapterShape
from adalora.data import DataError
from adalora.recipe import (HEATMAP_NAME, REPORT_NAME, SpecError, TrainSpec, print_summary, resolve_device,
                            run_train, spec_record)
from adalora.training import TrainingError

NAME = "demo"
HELP = ("train small AdaLoRA adapters (MiniLM classifiers, SmolLM2 causal-LM adapters), show where the ranks went, "
        "then serve each base with its adapters from one process")
USER_ERRORS = (assets.AssetError, DataError, SpecError, TrainingError)
DEMO_OUTPUTS = {"adapter.safetensors", REPORT_NAME, HEATMAP_NAME}
"""Files a demo run leaves in each adapter folder; an adapter folder holding only these is the demo's."""
TASKS = {"trec6": 1.0, "sms-spam": 0.75, "rt-sentiment": 0.5}
"""Classifier adapter id (= data set) -> its share of --steps."""
EXAMPLES = {
    "trec6": ("Who wrote the novel Moby Dick ?", "How far is the moon from the earth ?"),
    "sms-spam": ("WINNER!! You have won a free prize, text CLAIM to 80086 now", "Are we still on for lunch at noon?"),
    "rt-sentiment": ("A warm, funny and beautifully acted film.", "Tedious, predictable and far too long."),
}
"""What the served classifiers are asked, concurrently, after training."""
LM_TASKS = {"dialog": "moviedialog", "hamlet": "hamlet"}
"""Causal-LM adapter id -> its data set (movie-dialog statement -> reply pairs; two-line passages of Hamlet)."""
PROMPTS = ("I have a question for you:", "The weather today")
"""What the served causal LM is asked, with each selection below."""
MIX = {"dialog": 0.5, "hamlet": 0.5}
STORES = {"adapters": set(TASKS), "lm-adapters": set(LM_TASKS)}
"""The demo's adapter stores under --out: one per base model."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("--out", default="runs/demo",
                        help="output folder; adapters a previous demo trained there with the same settings are reused")
    parser.add_argument("--cache", default=None, help="asset cache (None: $ADALORA_CACHE or ~/.cache/adalora)")
    parser.add_argument("--steps", type=int, default=120, help="training steps of the TREC-6 classifier (SMS spam "
                                                               "takes 3/4 of them, RT sentiment half)")
    parser.add_argument("--lm-steps", type=int, default=30, help="training steps of each causal-LM adapter")
    parser.add_argument("--seed", type=int, default=0, help="random seed of every training run")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")


def check_out(out: Path) -> None:
    """Refuse an --out holding anything a demo did not write (it replaces stale adapters there)."""
    if not out.exists():
        return
    strays = sorted({p.name for p in out.iterdir()} - set(STORES))
    for store, ids in STORES.items():
        folders = sorted((out / store).iterdir()) if (out / store).is_dir() else []
        strays += [f"{store}/{f.name}" for f in folders if f.name not in ids or not f.is_dir()]
        strays += [f"{store}/{f.name}/{n.name}" for f in folders if f.name in ids and f.is_dir()
                   for n in f.iterdir() if n.name not in DEMO_OUTPUTS]
    if strays:
        raise SpecError(f"--out {out} holds files the demo did not write ({strays}): choose another --out")


def trained_before(spec: TrainSpec) -> dict | None:
    """The report of an earlier demo run of exactly `spec` whose adapter is still in place, else None."""
    out = Path(spec.out)
    try:
        report = json.loads((out / REPORT_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not (out / "adapter.safetensors").is_file() or report.get("spec") != spec_record(spec):
        return None
    return report


def train_or_reuse(spec: TrainSpec, what: str) -> dict:
    report = trained_before(spec)
    if report is not None:
        print(f"{what}: reusing {spec.out} (trained by an earlier demo with these settings; delete it to retrain)")
        return report
    shutil.rmtree(spec.out, ignore_errors=True)  # a stale demo adapter (check_out allowed only demo files)
    print(f"{what}: training {spec.total_steps} steps ...", flush=True)
    return run_train(spec)


def classifier_spec(out: Path, cache: str | None, task: str, steps: int, seed: int, device: str) -> TrainSpec:
    return TrainSpec(
        base_model=str(assets.model_path("minilm-l6", cache)), task="seq-cls",
        data=str(assets.dataset_path(task, "train", cache)),
        eval_data=str(assets.dataset_path(task, "eval", cache)), out=str(out),
        adapter=AdapterShape(mode="adalora", init_r=8, target_r=4, lora_alpha=16.0), total_steps=steps,
        batch_size=16, max_length=48, seed=seed, device=device, progress=False,
    )


def lm_spec(out: Path, cache: str | None, data: str, steps: int, seed: int, device: str) -> TrainSpec:
    return TrainSpec(
        base_model=str(assets.model_path("smollm2-135m", cache)), task="causal-lm",
        data=str(assets.dataset_path(data, "train", cache)), eval_data=str(assets.dataset_path(data, "eval", cache)),
        out=str(out), adapter=AdapterShape(mode="adalora", init_r=8, target_r=4, lora_alpha=16.0,
                                           target_modules=("q_proj", "v_proj")),
        total_steps=steps, batch_size=4, max_length=40, seed=seed, device=device, progress=False,
    )


def quiet_libraries() -> None:
    """Keep the log to what a reader needs: no transformers load reports, tokenizer length notes or bars."""
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("adalora").setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    from adalora.server.demo import serve_and_classify, serve_and_generate  # the serving half lives with the server

    quiet_libraries()
    assets.prepare(args.cache)
    out = Path(args.out)
    check_out(out)
    reports = {}
    for task, share in TASKS.items():
        spec = classifier_spec(out / "adapters" / task, args.cache, task, max(2, round(args.steps * share)),
                               args.seed, args.device)
        reports[task] = report = train_or_reuse(spec, f"MiniLM-L6 + {task} (AdaLoRA init_r 8 -> target_r 4, every "
                                                      f"linear map)")
        if task == "trec6":
            print_summary(report)
        print(f"  {task}: eval accuracy {report['eval']['accuracy']:.3f} on {report['data']['eval_examples']} held-out "
              f"rows; {report['steps']} steps; adapter {report['adapter_params']} params + head {report['head_params']}")
    print(f"rank heatmap: {reports['trec6']['heatmap']}")
    for adapter_id, data in LM_TASKS.items():
        spec = lm_spec(out / "lm-adapters" / adapter_id, args.cache, data, args.lm_steps, args.seed, args.device)
        report = train_or_reuse(spec, f"SmolLM2-135M + {data} as {adapter_id!r} (AdaLoRA on q_proj, v_proj)")
        print(f"  {adapter_id}: eval perplexity {report['eval']['perplexity']:.1f} on {report['data']['eval_examples']} "
              f"held-out rows; {report['adapter_params']} adapter params")
    device = str(resolve_device(args.device))
    serve_and_classify(str(assets.model_path("minilm-l6", args.cache)), str(out / "adapters"), EXAMPLES, device)
    selections = {"base": None, **{a: a for a in LM_TASKS}, "0.5 dialog + 0.5 hamlet": MIX}
    serve_and_generate(str(assets.model_path("smollm2-135m", args.cache)), str(out / "lm-adapters"), PROMPTS,
                       selections, device)
    return 0
