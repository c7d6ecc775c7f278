"""One training run from a spec: load and validate everything, inject, train, evaluate, write the outputs.

Nothing is written to `out` before every input has been loaded and validated; on an error a half-made
`out` is removed again (an `out` that existed before keeps exactly the files it had). Under torchrun
(WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel, each rank trains on its own slice
of every global batch, and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from adalora import data as data_mod
from adalora.adapter import base_identity
from adalora.adapter_file import save_adapter
from adalora.allocator import RankAllocator
from adalora.atomic import write_text_atomic
from adalora.collapse import DEFAULT_LR, diagnose
from adalora.config import AdaLoraConfig, AdapterShape, is_number
from adalora.dtypes import DTYPES
from adalora.inject import AdapterSet, inject_adapters
from adalora.report import format_rank_table, plot_rank_heatmap, table_dict
from adalora.training import (
    CHECKPOINT_NAME, StepLog, TrainArgs, TrainResult, env_world, seed_everything, steps_for_epochs, train,
)

REPORT_NAME = "report.json"
HEATMAP_NAME = "ranks.png"


class SpecError(ValueError):
    """A training spec value is invalid or the base model cannot be loaded; the message says what to change."""


@dataclass(frozen=True)
class TrainSpec:
    """Everything one `adalora train` run needs; validated on construction."""

    base_model: str
    """Local model folder (config.json, weights, tokenizer); nothing is downloaded."""
    task: str
    """'seq-cls' or 'causal-lm'."""
    data: str
    """Training data (.jsonl or .csv, see adalora.data)."""
    out: str
    """Output folder: adapter.safetensors, report.json, ranks.png (and checkpoint.pt)."""
    eval_data: str | None = None
    adapter: AdapterShape = AdapterShape()
    """Form, rank budget, scale and regularization of the adapter (validated by AdapterShape)."""
    total_steps: int | None = None
    epochs: float | None = None
    tinit: int | None = None
    tfinal: int | None = None
    deltaT: int | None = None
    """Schedule steps; None takes config.schedule_from_fractions(total_steps)."""
    lr: float | None = None
    """None: the mode's default, collapse.DEFAULT_LR (AdaLoRA 1e-2, LoRA 1e-3); `learning_rate` resolves it."""
    batch_size: int = 32
    """Per-process batch size (the global batch is batch_size * world_size)."""
    seed: int = 0
    max_length: int = 128
    warmup_steps: int = 0
    device: str = "auto"
    """'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:N'."""
    eval_every: int = 0
    """Evaluate on eval_data every N steps (0: only at the end)."""
    checkpoint_every: int = 0
    """Write out/checkpoint.pt every N steps (0: never)."""
    resume: bool = False
    """Continue from out/checkpoint.pt."""
    progress: bool = True
    labels: tuple[str, ...] | None = None
    """seq-cls label names in head order; None: the sorted labels of the training data."""
    dtype: str = "float32"
    """Base model weights dtype (adapters always train in float32)."""

    def __post_init__(self) -> None:
        if self.task not in data_mod.TASKS:
            raise SpecError(f"task={self.task!r} is not one of {data_mod.TASKS}")
        if (self.total_steps is None) == (self.epochs is None):
            raise SpecError("give exactly one of total_steps or epochs")
        if self.total_steps is not None and self.total_steps < 1:
            raise SpecError(f"total_steps={self.total_steps} must be >= 1")
        if self.epochs is not None and self.epochs <= 0:
            raise SpecError(f"epochs={self.epochs} must be > 0")
        for name in ("batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise SpecError(f"{name}={getattr(self, name)} must be >= 1")
        if self.lr is not None and not (is_number(self.lr) and self.lr > 0):
            raise SpecError(f"lr={self.lr!r} must be a number > 0 (or None for the mode's default)")
        for name in ("eval_every", "checkpoint_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise SpecError(f"{name}={getattr(self, name)} must be >= 0")
        if not isinstance(self.adapter, AdapterShape):
            raise SpecError(f"adapter must be an adalora.config.AdapterShape, got {type(self.adapter).__name__}")
        if self.dtype not in DTYPES:
            raise SpecError(f"dtype={self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.labels is not None and self.task != "seq-cls":
            raise SpecError("labels only apply to task='seq-cls'")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise SpecError(f"labels {list(self.labels)} contain duplicates")
        if self.eval_every and self.eval_data is None:
            raise SpecError("eval_every needs eval_data")
        if Path(self.data).resolve() == Path(self.out).resolve():
            raise SpecError("out must be a folder, not the data file")
        resolve_device(self.device)

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.adapter.mode] if self.lr is None else self.lr

    def adalora_config(self, total_steps: int) -> AdaLoraConfig:
        """The adapter config of this run (ConfigError names an inconsistent schedule or budget)."""
        return self.adapter.scheduled(total_steps, self.tinit, self.tfinal, self.deltaT)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; otherwise the named device (checked to exist)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise SpecError(f"device={name!r} is not a device name (use auto, cpu, cuda or cuda:N)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(f"device={name!r} but CUDA is not available: use --device cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise SpecError(f"device={name!r}: only cpu and cuda are supported")
    return device


@dataclass
class Prepared:
    """Validated, loaded inputs of a run; nothing written yet."""

    spec: TrainSpec
    model: torch.nn.Module
    tokenizer: object
    adapters: AdapterSet
    train_examples: list[data_mod.Example]
    eval_examples: list[data_mod.Example] | None
    labels: list[str] | None
    batches: Callable[[int], dict[str, torch.Tensor]]
    args: TrainArgs
    device: torch.device
    rank: int = 0
    world_size: int = 1
    eval_history: list[dict] = field(default_factory=list)


def load_base(spec: TrainSpec, labels: list[str] | None):
    """(model, tokenizer) from a local folder; causal LMs without a pad token pad with eos."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = Path(spec.base_model)
    if not (folder / "config.json").is_file():
        raise SpecError(f"base model {folder}: not a model folder (no config.json); run `adalora prepare` or pass a folder")
    kwargs = {"local_files_only": True, "dtype": DTYPES[spec.dtype]}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if spec.task == "seq-cls":
            model = AutoModelForSequenceClassification.from_pretrained(
                folder, num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)}, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as e:
        raise SpecError(f"cannot load base model from {folder}: {e}") from e
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def prepare(spec: TrainSpec) -> Prepared:
    """Load and validate data, labels, base model, target modules and schedule. Writes nothing."""
    rank, world = env_world()
    train_examples = data_mod.load_examples(spec.data, spec.task)
    eval_examples = data_mod.load_examples(spec.eval_data, spec.task) if spec.eval_data else None
    labels = None
    if spec.task == "seq-cls":
        labels = list(spec.labels) if spec.labels is not None else data_mod.label_set(train_examples)
        data_mod.check_labels(train_examples, labels, spec.data)
        if eval_examples is not None:
            data_mod.check_labels(eval_examples, labels, spec.eval_data)
        if len(labels) < 2:
            raise data_mod.DataError(f"{spec.data}: a classifier needs at least 2 labels, found {labels}")
    total = spec.total_steps or steps_for_epochs(len(train_examples), spec.batch_size, spec.epochs, world)
    config = spec.adalora_config(total)
    try:
        args = TrainArgs(total_steps=total, lr=spec.learning_rate, warmup_steps=spec.warmup_steps, seed=spec.seed,
                         checkpoint_every=spec.checkpoint_every, checkpoint_dir=spec.out)
    except ValueError as e:
        raise SpecError(str(e)) from e
    if spec.resume and not (Path(spec.out) / CHECKPOINT_NAME).is_file():
        raise SpecError(f"--resume: no checkpoint at {Path(spec.out) / CHECKPOINT_NAME}")
    if not spec.resume and Path(spec.out).exists() and any(Path(spec.out).iterdir()):
        raise SpecError(f"out={spec.out} exists and is not empty: choose a new folder, or pass resume to continue")
    device = resolve_device(spec.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    seed_everything(spec.seed)
    model, tokenizer = load_base(spec, labels)
    model.to(device)
    adapters = inject_adapters(model, config, task_type=spec.task, labels=labels)
    batches = data_mod.make_batches(train_examples, tokenizer, spec.task, spec.batch_size, spec.seed,
                                    spec.max_length, labels, rank, world)
    if eval_examples is not None:
        data_mod.encode(eval_examples, tokenizer, spec.task, spec.max_length, labels, spec.eval_data)
    return Prepared(spec, model, tokenizer, adapters, train_examples, eval_examples, labels, batches, args, device,
                    rank, world)


@contextlib.contextmanager
def _distributed(world: int, device: torch.device) -> Iterator[None]:
    """Init (and later destroy) the process group under torchrun, unless the caller already did."""
    dist = torch.distributed
    owned = world > 1 and not dist.is_initialized()
    if owned:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        if owned:
            dist.destroy_process_group()


@contextlib.contextmanager
def _clean_on_error(out: Path, write: bool) -> Iterator[None]:
    """Remove what this run added to `out` if it fails; a Ctrl-C keeps checkpoints for --resume."""
    existed = out.exists()
    before = set(os.listdir(out)) if existed else set()
    try:
        yield
    except BaseException as e:
        keep = isinstance(e, KeyboardInterrupt) and (out / CHECKPOINT_NAME).is_file()
        if write and not keep:
            if not existed:
                shutil.rmtree(out, ignore_errors=True)
            elif out.is_dir():
                for name in set(os.listdir(out)) - before:
                    target = out / name
                    shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        raise


def _progress(prep: Prepared):
    from tqdm import tqdm

    enabled = prep.spec.progress and prep.rank == 0 and sys.stderr.isatty()
    return tqdm(total=prep.args.total_steps, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


def fit(prep: Prepared) -> TrainResult:
    """Train (DDP-wrapped when distributed), with periodic evaluation and a progress bar."""
    spec, model = prep.spec, prep.model
    wrapped = model
    if prep.world_size > 1:
        ids = [prep.device.index] if prep.device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    bar = _progress(prep)

    def on_step(log: StepLog, allocator: RankAllocator | None) -> None:
        postfix = {"loss": f"{log.loss:.4f}"}
        if log.budget is not None:
            postfix["budget"] = log.budget
        if spec.eval_every and (log.step + 1) % spec.eval_every == 0 and prep.rank == 0:
            metrics = _evaluate(prep)
            prep.eval_history.append({"step": log.step + 1, **metrics})
        if prep.eval_history:
            postfix.update({k: f"{v:.4f}" for k, v in prep.eval_history[-1].items() if k != "step"})
        bar.n = log.step + 1
        bar.set_postfix(postfix, refresh=True)

    try:
        return train(prep.adapters, prep.batches, prep.args, model=wrapped, on_step=on_step, resume=spec.resume)
    finally:
        bar.close()


def _evaluate(prep: Prepared) -> dict:
    return data_mod.evaluate(prep.model, prep.eval_examples, prep.tokenizer, prep.spec.task, prep.labels,
                             max_length=prep.spec.max_length)


def build_report(prep: Prepared, result: TrainResult, eval_metrics: dict | None) -> dict:
    adapters, allocator, spec = prep.adapters, result.allocator, prep.spec
    config = adapters.config
    if allocator is not None:
        reached = allocator.reached()
        unit = "params" if config.budget is not None else "triplets"
        target = allocator.target_budget
    else:
        ranks = {p: layer.rank for p, layer in adapters.layers.items()}
        costs = adapters.triplet_costs()  # lam is frozen at 1 in lora mode: r * (in + out) are trained
        reached = {"ranks": ranks, "triplets": sum(ranks.values()),
                   "params": sum(ranks[p] * (costs[p] - 1) for p in ranks)}
        unit, target = "triplets", reached["triplets"]
    history = result.history
    return {
        "mode": config.mode,
        "task": spec.task,
        "base": base_identity(adapters.model),
        "base_model": str(spec.base_model),
        "labels": prep.labels,
        "ranks": reached["ranks"],
        "ranks_table": table_dict(reached["ranks"]),
        "adapter_params": reached["params"],
        "head_params": sum(p.numel() for p in adapters.head_parameters()),
        "budget": {"unit": unit, "target": target, "reached_triplets": reached["triplets"],
                   "reached_params": reached["params"]},
        "eval": eval_metrics or {},
        "eval_history": prep.eval_history,
        "final_loss": history[-1].loss if history else None,
        "warnings": diagnose(config.mode, prep.args.lr, [h.loss for h in history], (eval_metrics or {}).get("accuracy"),
                             [e.label for e in prep.eval_examples or [] if e.label is not None]),
        "steps": prep.args.total_steps,
        "steps_run": len(history),
        "seconds": result.seconds,
        "seconds_per_step": statistics.median(h.seconds for h in history) if history else None,
        "config": config.to_dict(),
        "train_args": asdict(prep.args),
        "spec": spec_record(spec),
        "data": {"train": str(spec.data), "train_examples": len(prep.train_examples),
                 "eval": spec.eval_data, "eval_examples": len(prep.eval_examples or [])},
        "device": str(prep.device),
        "world_size": prep.world_size,
    }


def spec_record(spec: TrainSpec) -> dict:
    """The spec as report.json holds it (JSON values): what a later run compares to know it would train the same."""
    record = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items()}
    record["lr"] = spec.learning_rate  # the lr it ran at, were the mode's default to change
    return json.loads(_json(record))


def write_outputs(prep: Prepared, result: TrainResult, report: dict) -> None:
    out = Path(prep.spec.out)
    masks = result.allocator.masks if result.allocator is not None else None
    info = {"config": report["config"], "budget": report["budget"], "eval": report["eval"], "steps": report["steps"]}
    adapter = prep.adapters.export(masks, info=info)
    report["adapter_file"] = str(save_adapter(adapter, out))
    plot_rank_heatmap(report["ranks"], out / HEATMAP_NAME,
                      f"{report['mode']} ranks ({report['budget']['reached_triplets']} kept)")
    report["heatmap"] = str(out / HEATMAP_NAME)
    write_text_atomic(out / REPORT_NAME, _json(report))


def _json(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=True, default=str) + "\n"


def run_train(spec: TrainSpec, on_trained: Callable[[Prepared, TrainResult], None] | None = None) -> dict:
    """Validate everything, train, evaluate, write out/ (rank 0 only) and return the report.

    `on_trained(prepared, result)` runs on every rank after training (e.g. to inspect DDP replicas).
    """
    rank, world = env_world()
    out = Path(spec.out)
    prep = prepare(spec)
    with _distributed(world, prep.device), _clean_on_error(out, write=rank == 0):
        result = fit(prep)
        if on_trained is not None:
            on_trained(prep, result)
        eval_metrics = _evaluate(prep) if prep.eval_examples is not None and rank == 0 else None
        report = build_report(prep, result, eval_metrics)
        if rank == 0:
            write_outputs(prep, result, report)
    return report


def print_summary(report: dict, stream=None) -> None:
    stream = stream or sys.stdout
    print(format_rank_table(report["ranks"]), file=stream)
    b = report["budget"]
    print(f"budget: {b['reached_triplets']} triplets / {b['reached_params']} params "
          f"(target {b['target']} {b['unit']})", file=stream)
    if report["eval"]:
        print("eval: " + ", ".join(f"{k}={v:.4f}" for k, v in report["eval"].items()), file=stream)
    for warning in report.get("warnings", ()):
        print(f"warning: {warning}", file=sys.stderr if stream is sys.stdout else stream)
