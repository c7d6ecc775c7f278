"""Per-module merge weights fit by distillation: each input's own adapter teaches the merged model on that
input's unlabeled text, and only one weight per (input, module) is learned.

The merged update of module m is sum_i c[i, m] * delta_i(m): the stacked factors of `linear` with each input's
lam segment scaled by its own c[i, m], so every input keeps its own rank in every layer and no dense delta is
formed. The weights start at --weights. One step, for every input i: a batch of i's rows runs through the
base with input i alone (c = one-hot i: exactly adapter i and its own head, the teacher, no gradient) and
through the merged model (c, input i's head), and the loss adds KL(teacher || merged) of the outputs (logits;
the squared error of the last hidden states for a feature-extraction adapter), over real tokens only. Adam
updates c. This is AdaMerging's layer-wise weights (Yang et al., ICLR 2024) with its entropy objective replaced
by distillation from the tasks' own adapters, which on our six-task merge is stable where entropy was not
(docs/BENCHMARKS.md); the rows need no labels.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from adalora.adapter import Adapter, AdapterLayer
from adalora.config import is_int, is_number
from adalora.data import DataError, load_examples
from adalora.inject import attach_adapter
from adalora.tools.merge.lowrank import concat_layer, union_shapes
from adalora.tools.merge.strategies import MergeError


@dataclass(frozen=True)
class FitConfig:
    """How the weights are fit; validated once here."""

    steps: int = 100
    batch_size: int = 16
    lr: float = 1e-2
    max_rows: int = 1000
    """Rows read from each data file (the first ones)."""
    max_length: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_rows", "max_length"):
            if not is_int(getattr(self, name), 1):
                raise MergeError(f"distill {name}={getattr(self, name)!r} must be a positive integer")
        if not (is_number(self.lr) and self.lr > 0):
            raise MergeError(f"distill lr={self.lr!r} must be a positive number")
        if not is_int(self.seed, 0):
            raise MergeError(f"--seed {self.seed} must be a non-negative integer")


class SegmentScale(nn.Module):
    """lam -> lam * c[segment]: the parametrization of one merged module's stacked lam. `teacher` (shared by all
    modules) set to i gives input i alone, weight 1, instead of the fitted weights."""

    def __init__(self, coef: nn.Parameter, segment: torch.Tensor, teacher: list[int | None]):
        super().__init__()
        self.coef, self.teacher = coef, teacher
        self.register_buffer("segment", segment)

    def forward(self, lam: torch.Tensor) -> torch.Tensor:
        if self.teacher[0] is not None:
            return lam * (self.segment == self.teacher[0]).to(lam.dtype)
        return lam * self.coef[self.segment]


def read_texts(paths: list[str], n_inputs: int, max_rows: int) -> list[list[str]]:
    """One data file per input; each row's text ("text", or "prompt" + "completion"); labels are not read."""
    if len(paths) != n_inputs:
        raise MergeError(f"--data has {len(paths)} file(s) for {n_inputs} adapter(s): give one per adapter, in order")
    texts = []
    for path in paths:
        try:
            rows = load_examples(path, "causal-lm")[:max_rows]
        except DataError as e:
            raise MergeError(f"--data {e}") from e
        texts.append([r.text + (r.completion or "") for r in rows])
    return texts


def _model_class(task_type: str):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    return {"seq-cls": AutoModelForSequenceClassification, "causal-lm": AutoModelForCausalLM,
            "feature-extraction": AutoModel}[task_type]


def _heads(model: nn.Module, adapters: list[Adapter]) -> list[dict[str, nn.Module]]:
    """Each input's head as copies of the model's head modules holding that input's tensors (label counts differ)."""
    names = sorted({key.split(".")[0] for a in adapters for key in a.head})
    out = []
    for adapter in adapters:
        modules = {}
        for name in names:
            module = copy.deepcopy(model.get_submodule(name))
            for key, tensor in adapter.head.items():
                if key.split(".")[0] != name:
                    continue
                owner, _, pname = key.partition(".")[2].rpartition(".")
                target = module.get_submodule(owner) if owner else module
                setattr(target, pname, nn.Parameter(tensor.float().clone(), requires_grad=False))
            modules[name] = module
        out.append(modules)
    return out


def _divergence(student, teacher, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of logits, or the squared error of hidden states, averaged over real positions."""
    if hasattr(teacher, "logits"):
        s, t = student.logits.float(), teacher.logits.float()
        per = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1)
    else:
        s, t = student.last_hidden_state.float(), teacher.last_hidden_state.float()
        per = (s - t).pow(2).mean(-1)
    if per.dim() == 1:  # one output per row (seq-cls)
        return per.mean()
    m = mask.to(per.dtype)
    return (per * m).sum() / m.sum().clamp_min(1.0)


class MergedModel:
    """The base with every input's factors attached side by side (`linear` at weight 1) and module m's lam segments
    scaled by the trainable coefs[m] (n,): the merged model whose weights are fit. `forward(i, batch, teacher=True)`
    runs input i alone instead (adapter i exactly), both with input i's head."""

    def __init__(self, adapters: list[Adapter], weights: list[float], base_model_dir: str | Path):
        from transformers import AutoTokenizer

        n, task = len(adapters), adapters[0].task_type
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir), local_files_only=True)
            heads = {"num_labels": len(adapters[0].labels or []), "ignore_mismatched_sizes": True} \
                if task == "seq-cls" else {}  # the base's own head may have any label count: input 0's is loaded
            model = _model_class(task).from_pretrained(str(base_model_dir), dtype=torch.float32,
                                                       local_files_only=True, **heads).eval()
        except (OSError, ValueError) as e:
            raise MergeError(f"--base-model {base_model_dir}: cannot load the model and tokenizer there ({e})") from e
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if task == "seq-cls":
            model.config.pad_token_id = self.tokenizer.pad_token_id
        ones = [1.0] * n
        stacked = {p: layer for p in union_shapes(adapters) if (layer := concat_layer(adapters, ones, p)) is not None}
        shell = Adapter(base=dict(adapters[0].base), shapes=union_shapes(adapters), layers=stacked, init_r=1,
                        lora_alpha=1.0, mode="adalora", task_type=task, labels=adapters[0].labels,
                        head=dict(adapters[0].head))
        adapter_set = attach_adapter(model, shell)
        for param in model.parameters():
            param.requires_grad_(False)
        self.model, self.adapters, self.start = model, adapters, list(weights)
        self._teacher: list[int | None] = [None]
        self.coefs: dict[str, nn.Parameter] = {}
        for path in stacked:
            ranks = [a.layers[path].rank if path in a.layers else 0 for a in adapters]
            segment = torch.repeat_interleave(torch.arange(n), torch.tensor(ranks))
            self.coefs[path] = nn.Parameter(torch.tensor(weights, dtype=torch.float32))
            parametrize.register_parametrization(adapter_set.layers[path], "lam",
                                                 SegmentScale(self.coefs[path], segment, self._teacher))
        self.heads = _heads(model, adapters) if task == "seq-cls" else [{} for _ in adapters]

    def forward(self, i: int, batch: dict, teacher: bool = False):
        for name, module in self.heads[i].items():
            setattr(self.model, name, module)
        self._teacher[0] = i if teacher else None
        try:
            return self.model(**batch)
        finally:
            self._teacher[0] = None

    def divergence(self, i: int, batch: dict) -> torch.Tensor:
        """KL(input i alone || the merged model) on `batch` (see _divergence), differentiable in coefs."""
        with torch.no_grad():
            target = self.forward(i, batch, teacher=True)
        return _divergence(self.forward(i, batch), target, batch["attention_mask"])

    def weights(self) -> dict[str, list[float]]:
        """{module path: one weight per input} (an input without that module keeps its start weight there)."""
        return {path: [float(c) if path in a.layers else w for c, a, w in zip(coef.detach(), self.adapters, self.start)]
                for path, coef in self.coefs.items()}


def fit_module_weights(adapters: list[Adapter], weights: list[float], base_model_dir: str | Path,
                       texts: list[list[str]], config: FitConfig, log=None) -> dict[str, list[float]]:
    """{module path: one fitted weight per input}, from `weights` (one per input) by config.steps Adam steps."""
    merged = MergedModel(adapters, weights, base_model_dir)
    optimizer = torch.optim.Adam(list(merged.coefs.values()), lr=config.lr)
    rng = random.Random(config.seed)
    for step in range(config.steps):
        optimizer.zero_grad()
        total = 0.0
        for i, rows in enumerate(texts):
            batch = merged.tokenizer(rng.sample(rows, min(config.batch_size, len(rows))), return_tensors="pt",
                                     padding=True, truncation=True, max_length=config.max_length)
            loss = merged.divergence(i, batch) / len(texts)
            loss.backward()
            total += float(loss.detach())
        optimizer.step()
        if log is not None and (step % 10 == 0 or step == config.steps - 1):
            log(f"distill step {step + 1}/{config.steps}: divergence {total:.4f}")
    return merged.weights()


def reweighted(adapters: list[Adapter], module_weights: dict[str, list[float]]) -> list[Adapter]:
    """Each input with its lam at module m multiplied by its fitted weight there: merging these with weights 1 gives
    sum_i c[i, m] delta_i(m)."""
    out = []
    for i, adapter in enumerate(adapters):
        layers = {path: AdapterLayer(P=layer.P, lam=layer.lam * module_weights[path][i], Q=layer.Q)
                  for path, layer in adapter.layers.items()}
        out.append(dataclasses.replace(adapter, layers=layers))
    return out
