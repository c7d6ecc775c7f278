"""The compact adapter as a domain object: per-layer factors at their kept ranks, plus metadata."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch
from torch import nn

from adalora.delta import delta_weight

TASK_TYPES = ("seq-cls", "causal-lm", "feature-extraction")
# Config keys that do not change the backbone's weights: two fine-tunes of one base differ in these.
_IDENTITY_IGNORED = {
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "id2label",
    "label2id", "num_labels", "problem_type", "finetuning_task", "use_cache", "output_attentions",
    "output_hidden_states", "return_dict", "torchscript", "quantization_config", "_attn_implementation",
    "_attn_implementation_autoset", "_commit_hash", "pad_token_id", "auto_map", "output_scores",
}


@dataclass
class AdapterLayer:
    """Compact factors of one adapted matrix: P (out, r), lam (r,), Q (r, in)."""

    P: torch.Tensor
    lam: torch.Tensor
    Q: torch.Tensor

    @property
    def rank(self) -> int:
        return self.lam.shape[0]

    @property
    def num_params(self) -> int:
        return self.P.numel() + self.lam.numel() + self.Q.numel()


@dataclass
class Adapter:
    """A trained adapter. `shapes` lists every adapted module (in, out), including those at rank 0,
    which have no entry in `layers`."""

    base: dict
    """Base identity: {'name': str, 'config_sha256': str}."""
    shapes: dict[str, tuple[int, int]]
    layers: dict[str, AdapterLayer]
    init_r: int
    lora_alpha: float
    mode: str = "adalora"
    task_type: str = "causal-lm"
    labels: list[str] | None = None
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    """Free-form provenance (training config, budget reached, merge inputs)."""

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.init_r

    def module_scales(self) -> dict[str, float]:
        """The factor each module's P diag(lam) Q runs at: `scale`, times a LoRA-mode module's lam (uniform there:
        the per-module scale of a PEFT LoRA with alpha / rank patterns or rsLoRA, folded in at import)."""
        return {path: self.scale * (float(self.layers[path].lam[0]) if self.mode == "lora" and path in self.layers
                                    else 1.0) for path in self.shapes}

    def ranks(self) -> dict[str, int]:
        return {path: (self.layers[path].rank if path in self.layers else 0) for path in self.shapes}

    def num_params(self) -> int:
        """Adapter parameters (P, lam, Q of kept ranks); the head is counted separately."""
        return sum(layer.num_params for layer in self.layers.values())

    def head_params(self) -> int:
        return sum(t.numel() for t in self.head.values())

    def delta(self, path: str) -> torch.Tensor:
        """Dense (out, in) update of one module; zeros for a module at rank 0."""
        if path not in self.layers:
            in_f, out_f = self.shapes[path]
            return torch.zeros(out_f, in_f)
        layer = self.layers[path]
        return delta_weight(layer.P, layer.lam, layer.Q, self.scale)


def base_mismatch(made_for: dict, base: dict) -> str | None:
    """The one base check: None when an adapter made for base identity `made_for` fits `base` (the same digest of
    the architecture-defining config); else the message every caller raises its own error with."""
    if made_for.get("config_sha256") == base.get("config_sha256"):
        return None
    return (f"adapter was trained on base {made_for.get('name')!r} (config {str(made_for.get('config_sha256'))[:12]}), "
            f"not on {base.get('name')!r} (config {str(base.get('config_sha256'))[:12]})")


def base_identity(model: nn.Module) -> dict:
    """Name and a hash of the architecture-defining config of a transformers model."""
    config = model.config.to_dict()
    kept = {k: v for k, v in sorted(config.items()) if k not in _IDENTITY_IGNORED}
    digest = hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()
    name = config.get("_name_or_path") or config.get("model_type", "unknown")
    return {"name": str(name), "model_type": config.get("model_type", "unknown"), "config_sha256": digest}


def is_causal_lm(config) -> bool:
    """Whether a transformers config's architectures name a causal LM class: *ForCausalLM, or another class
    transformers maps to causal LM (GPT2LMHeadModel, ...). Decides how a base folder is served and read."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = {name for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
              for name in ((names,) if isinstance(names, str) else names)}
    architectures = getattr(config, "architectures", None) or []
    return any(a.endswith("ForCausalLM") or a in causal for a in architectures)
