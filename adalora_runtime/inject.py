"""Injecting SVD-form adapters into a transformers model, with an explicit registry of what was adapted."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from adalora.adapter import Adapter, AdapterLayer, base_identity, base_mismatch
from adalora.config import AdaLoraConfig, ConfigError
from adalora.layers import ADAPTABLE, SVDLinear, linear_dims

_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Every linear map of each block, as in the AdaLoRA paper (W_q, W_k, W_v, W_o, W_f1, W_f2).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE, "gemma2": _LLAMA_LIKE,
    "bert": ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
    "roberta": ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
    "distilbert": ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}
HEAD_NAMES = ("classifier", "score")
TASK_TYPES_WITH_HEAD = ("seq-cls",)


def matches(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


def adaptable_paths(model: nn.Module) -> list[str]:
    """Linear / Conv1D module paths; an already adapted layer counts once (not its inner .base)."""
    adapted = [name for name, module in model.named_modules() if isinstance(module, SVDLinear)]
    return [
        name for name, module in model.named_modules()
        if name and (isinstance(module, SVDLinear) or (isinstance(module, ADAPTABLE) and name.rpartition(".")[0] not in adapted))
    ]


def resolve_targets(model: nn.Module, targets: tuple[str, ...], exclude: tuple[str, ...] = HEAD_NAMES) -> list[str]:
    """Module paths selected by `targets` (suffix match); errors list what is available."""
    model_type = getattr(model.config, "model_type", "")
    if not targets:
        if model_type not in DEFAULT_TARGETS:
            raise ConfigError(
                f"no default target modules for model_type={model_type!r}; pass target_modules "
                f"(available: {sorted({p.split('.')[-1] for p in adaptable_paths(model)})})"
            )
        targets = DEFAULT_TARGETS[model_type]
    candidates = [p for p in adaptable_paths(model) if not any(p.split(".")[0] == h for h in exclude)]
    unknown = [t for t in targets if not any(matches(p, t) for p in candidates)]
    if unknown:
        available = sorted({p.split(".")[-1] for p in candidates} | {".".join(p.split(".")[-2:]) for p in candidates})
        raise ConfigError(f"unknown target module(s) {unknown}; available linear modules: {available}")
    return [p for p in candidates if any(matches(p, t) for t in targets)]


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


@dataclass
class AdapterSet:
    """The adapted modules of one model, in model order, and its trainable head."""

    model: nn.Module
    config: AdaLoraConfig
    layers: dict[str, SVDLinear]
    task_type: str
    head: dict[str, nn.Module] = field(default_factory=dict)
    labels: list[str] | None = None

    def factor_parameters(self) -> list[nn.Parameter]:
        params = []
        for layer in self.layers.values():
            params += [layer.P, layer.Q]
            if self.config.mode == "adalora":
                params.append(layer.lam)
        return params

    def lambda_parameters(self) -> list[nn.Parameter]:
        return [layer.lam for layer in self.layers.values()] if self.config.mode == "adalora" else []

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for module in self.head.values() for p in module.parameters()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.factor_parameters() + self.head_parameters()

    def triplet_costs(self) -> dict[str, int]:
        """Parameters one triplet (P column, lam entry, Q row) costs in each layer."""
        return {path: layer.in_features + layer.out_features + 1 for path, layer in self.layers.items()}

    def export(self, masks: dict[str, torch.Tensor] | None = None, info: dict | None = None) -> Adapter:
        """Compact adapter holding only the kept ranks (masks: path -> bool (r,); None keeps all)."""
        layers = {}
        for path, layer in self.layers.items():
            keep = masks[path] if masks is not None else torch.ones(layer.rank, dtype=torch.bool)
            keep = keep.to(layer.lam.device)
            if int(keep.sum()) == 0:
                continue
            layers[path] = AdapterLayer(
                P=layer.P.detach()[:, keep].float().cpu().contiguous(),
                lam=layer.lam.detach()[keep].float().cpu().contiguous(),
                Q=layer.Q.detach()[keep].float().cpu().contiguous(),
            )
        head = {
            f"{name}.{pname}": p.detach().float().cpu().contiguous()
            for name, module in self.head.items()
            for pname, p in module.named_parameters()
        }
        return Adapter(
            base=base_identity(self.model),
            shapes={path: (layer.in_features, layer.out_features) for path, layer in self.layers.items()},
            layers=layers,
            init_r=self.config.init_r,
            lora_alpha=self.config.lora_alpha,
            mode=self.config.mode,
            task_type=self.task_type,
            labels=self.labels,
            head=head,
            info=dict(info or {}),
        )


def inject_adapters(
    model: nn.Module,
    config: AdaLoraConfig,
    task_type: str = "causal-lm",
    labels: list[str] | None = None,
    ranks: dict[str, int] | None = None,
    paths: list[str] | None = None,
) -> AdapterSet:
    """Freeze `model`, wrap the target linear layers in SVDLinear, and return the registry.

    `ranks` overrides the per-layer rank (loading a compact adapter); `paths` bypasses target
    resolution with an explicit list of module paths.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    paths = paths if paths is not None else resolve_targets(model, config.target_modules)
    layers: dict[str, SVDLinear] = {}
    for path in paths:
        base = model.get_submodule(path)
        if isinstance(base, SVDLinear):
            raise ConfigError(f"{path} is already adapted: inject adapters once per model")
        linear_dims(base)
        rank = config.init_r if ranks is None else ranks.get(path, 0)
        layer = SVDLinear(base, rank, config.scale, config.dropout)
        layer.reset(config.init, config.mode)
        if config.mode == "lora":
            layer.lam.requires_grad_(False)
        _set_submodule(model, path, layer)
        layers[path] = layer
    head: dict[str, nn.Module] = {}
    if task_type in TASK_TYPES_WITH_HEAD:
        head = {name: model.get_submodule(name) for name in HEAD_NAMES if hasattr(model, name)}
        if not head:
            raise ConfigError(f"task {task_type!r} needs a classification head named one of {HEAD_NAMES}")
        for module in head.values():
            module.requires_grad_(True)
    return AdapterSet(model=model, config=config, layers=layers, task_type=task_type, head=head, labels=labels)


def attach_adapter(model: nn.Module, adapter: Adapter, dropout: float = 0.0) -> AdapterSet:
    """Inject a loaded compact adapter into a fresh base model (shapes checked) for inference."""
    identity = base_identity(model)
    problem = base_mismatch(adapter.base, identity)
    if problem:
        raise ConfigError(f"{problem}, this model")
    for path, (in_f, out_f) in adapter.shapes.items():
        try:
            module = model.get_submodule(path)
        except AttributeError as e:
            raise ConfigError(f"adapter module {path!r} does not exist in this base model") from e
        if linear_dims(module) != (in_f, out_f):
            raise ConfigError(f"{path}: adapter expects (in, out)=({in_f}, {out_f}), base has {linear_dims(module)}")
    config = AdaLoraConfig(mode="lora", init_r=adapter.init_r, lora_alpha=adapter.lora_alpha, dropout=dropout)
    adapters = inject_adapters(model, config, task_type=adapter.task_type, labels=adapter.labels,
                               ranks=adapter.ranks(), paths=list(adapter.shapes))
    with torch.no_grad():
        for path, layer in adapter.layers.items():
            target = adapters.layers[path]
            target.P.copy_(layer.P)
            target.lam.copy_(layer.lam)
            target.Q.copy_(layer.Q)
        for name, module in adapters.head.items():
            for pname, p in module.named_parameters():
                key = f"{name}.{pname}"
                if not adapter.head:
                    raise ConfigError(f"this {adapter.task_type} adapter carries no classification head (a merge "
                                      "keeps one only with --head-from K)")
                if key not in adapter.head:
                    raise ConfigError(f"adapter has no head tensor {key!r}")
                if adapter.head[key].shape != p.shape:
                    raise ConfigError(f"head tensor {key}: adapter {tuple(adapter.head[key].shape)} vs model {tuple(p.shape)}")
                p.copy_(adapter.head[key])
    for p in model.parameters():
        p.requires_grad_(False)
    return adapters
