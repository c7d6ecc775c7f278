"""The training loop: forward, visible orthogonal regularizer, optimizer, allocator, checkpoints.

Data is a pure function of the step (`batches(step) -> dict of tensors`), so a run resumed from a
checkpoint sees exactly the batches, masks and optimizer state of an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from adalora.allocator import RankAllocator
from adalora.atomic import atomic_file
from adalora.inject import AdapterSet
from adalora.regularizer import orth_penalty

CHECKPOINT_NAME = "checkpoint.pt"


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a NaN loss); the message says at which step."""


@dataclass(frozen=True)
class TrainArgs:
    """Optimizer and loop settings (the adapter schedule lives in AdaLoraConfig)."""

    total_steps: int
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    """Linear warm-up steps, then linear decay to 0 (transformers' default schedule)."""
    grad_clip: float = 1.0
    """Max global grad norm (0 disables clipping)."""
    seed: int = 0
    checkpoint_every: int = 0
    """Write DIR/checkpoint.pt every N steps (0: never)."""
    checkpoint_dir: str | None = None

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps={self.total_steps} must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, total_steps={self.total_steps})")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("checkpoint_every needs checkpoint_dir")


@dataclass
class StepLog:
    step: int
    loss: float
    reg: float
    budget: int | None
    seconds: float


@dataclass
class TrainResult:
    adapters: AdapterSet
    allocator: RankAllocator | None
    history: list[StepLog] = field(default_factory=list)
    seconds: float = 0.0

    def masks(self) -> dict[str, torch.Tensor] | None:
        return self.allocator.masks if self.allocator is not None else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def param_groups(adapters: AdapterSet, lr: float, weight_decay: float) -> list[dict]:
    """P, Q and the head at lr; lam at lr * lambda_lr_scale, without weight decay."""
    lam_ids = {id(p) for p in adapters.lambda_parameters()}
    others = [p for p in adapters.trainable_parameters() if id(p) not in lam_ids]
    groups = [{"params": others, "lr": lr, "weight_decay": weight_decay}]
    if lam_ids:
        groups.append({"params": adapters.lambda_parameters(), "lr": lr * adapters.config.lambda_lr_scale,
                       "weight_decay": 0.0})
    return groups


def make_optimizer(adapters: AdapterSet, args: TrainArgs) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(adapters, args.lr, args.weight_decay))


def make_scheduler(opt: torch.optim.Optimizer, args: TrainArgs) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        return max(0.0, (args.total_steps - step) / max(1, args.total_steps - args.warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def autocast_for(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA (fp16 where bf16 is unsupported); disabled on the CPU."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def train(
    adapters: AdapterSet,
    batches: Callable[[int], dict[str, torch.Tensor]],
    args: TrainArgs,
    model: torch.nn.Module | None = None,
    on_step: Callable[[StepLog, RankAllocator | None], None] | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train the adapters of `adapters.model` (or `model`, e.g. its DDP wrapper) for args.total_steps.

    The loss is model(**batch).loss + orth_reg_weight * orth_penalty(adapters), computed here in the
    open. With resume=True a checkpoint in args.checkpoint_dir is restored first.
    """
    model = model if model is not None else adapters.model
    device = next(adapters.model.parameters()).device
    config = adapters.config
    allocator = RankAllocator(adapters) if config.mode == "adalora" else None
    opt = make_optimizer(adapters, args)
    sched = make_scheduler(opt, args)
    start = 0
    if resume:
        start = load_checkpoint(Path(args.checkpoint_dir), adapters, opt, sched, allocator)
    gamma = config.orth_reg_weight if allocator is not None else 0.0
    params = adapters.trainable_parameters()
    result = TrainResult(adapters=adapters, allocator=allocator)
    model.train()
    t0 = time.perf_counter()
    for step in range(start, args.total_steps):
        t_step = time.perf_counter()
        batch = {k: v.to(device) for k, v in batches(step).items()}
        with autocast_for(device):
            loss = model(**batch).loss
        reg = orth_penalty(adapters) if gamma > 0 else torch.zeros((), device=device)
        if not torch.isfinite(loss):
            raise TrainingError(f"loss is {loss.item()} at step {step}: lower the learning rate or check the data")
        (loss.float() + gamma * reg).backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        sched.step()
        budget = allocator.step(step) if allocator is not None else None
        opt.zero_grad(set_to_none=True)
        log = StepLog(step, loss.item(), float(reg.detach()), budget, time.perf_counter() - t_step)
        result.history.append(log)
        if on_step is not None:
            on_step(log, allocator)
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0 and _is_main():
            save_checkpoint(Path(args.checkpoint_dir), step + 1, adapters, opt, sched, allocator)
    result.seconds = time.perf_counter() - t0
    model.eval()
    return result


def _is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def save_checkpoint(directory: Path, next_step: int, adapters: AdapterSet, opt, sched, allocator) -> Path:
    """Adapter and head tensors, optimizer, scheduler, allocator state (EMAs, masks) and RNG states."""
    state = {
        "next_step": next_step,
        "params": [p.detach().cpu() for p in adapters.trainable_parameters()],
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "allocator": allocator.state_dict() if allocator is not None else None,
        "rng": _rng_state(),
    }
    target = directory / CHECKPOINT_NAME
    with atomic_file(target) as tmp:
        torch.save(state, tmp)
    return target


def load_checkpoint(directory: Path, adapters: AdapterSet, opt, sched, allocator) -> int:
    """Restore a checkpoint written by save_checkpoint; returns the step to continue from."""
    path = directory / CHECKPOINT_NAME
    if not path.is_file():
        raise TrainingError(f"no checkpoint at {path} to resume from")
    state = torch.load(path, map_location="cpu", weights_only=True)
    params = adapters.trainable_parameters()
    if len(state["params"]) != len(params) or any(a.shape != b.shape for a, b in zip(state["params"], params)):
        raise TrainingError(f"{path} was written for a different adapter layout (target modules or ranks differ)")
    with torch.no_grad():
        for p, saved in zip(params, state["params"]):
            p.copy_(saved)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if allocator is not None:
        if state["allocator"] is None:
            raise TrainingError(f"{path} was written by a lora-mode run; cannot resume in adalora mode")
        allocator.load_state_dict(state["allocator"])
    _set_rng_state(state["rng"])
    return int(state["next_step"])


def _rng_state() -> dict:
    """torch, numpy and python RNG states in types torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))


def steps_for_epochs(n_examples: int, batch_size: int, epochs: float, world_size: int = 1) -> int:
    return max(1, math.ceil(epochs * n_examples / (batch_size * world_size)))


def env_world() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; (0, 1) when not distributed."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
