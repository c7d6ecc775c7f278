"""Factories the tests share: tiny random models and adapters built in code (no files, milliseconds)."""

from __future__ import annotations

import copy

import torch
from transformers import LlamaForCausalLM

from adalora.config import AdaLoraConfig
from adalora.inject import inject_adapters
from tests.conftest import tiny_bert, tiny_llama_config

LLAMA_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BERT_LINEARS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
ENCODER_TEXTS = ["w5 w6 w7", "w30 w31", "w9 w40 w41 w42 w43"]
"""Texts of the word tokenizer (tests/server_setup.py) the encoder server tests classify and embed."""


def random_adapter(model, seed, init_r=4, lora_alpha=8.0, targets=LLAMA_ALL, task_type="causal-lm", labels=None):
    """inject_adapters + random factors + random per-layer ranks in 0..init_r (some layers at rank 0), exported."""
    model = copy.deepcopy(model)
    config = AdaLoraConfig(init_r=init_r, lora_alpha=lora_alpha, target_r=init_r / 2, total_step=10,
                           target_modules=targets)
    adapters = inject_adapters(model, config, task_type=task_type, labels=labels)
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    with torch.no_grad():
        for path, layer in adapters.layers.items():
            layer.P.copy_(torch.randn(layer.P.shape, generator=gen) * 0.3)
            layer.lam.copy_(torch.randn(layer.lam.shape, generator=gen))
            layer.Q.copy_(torch.randn(layer.Q.shape, generator=gen) * 0.3)
            r = int(torch.randint(0, init_r + 1, (1,), generator=gen))
            masks[path] = torch.arange(init_r) < r
        for module in adapters.head.values():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
    return adapters.export(masks)


def varied_llama() -> LlamaForCausalLM:
    """The tiny Llama with larger random weights, so greedy outputs change token to token (at the default
    init range most prompts repeat one token and an identity test could not fail)."""
    torch.manual_seed(0)
    config = tiny_llama_config()
    config.initializer_range = 0.3
    return LlamaForCausalLM(config).eval()


def encoder_adapters(topic_labels: tuple[str, ...] = ("a", "b", "c", "d")) -> dict:
    """The encoder server tests' store on tiny_bert: 'sent' (seq-cls neg/pos, every linear), 'topic' (seq-cls over
    `topic_labels`, half the linears) and 'feat' (feature extraction)."""
    return {"sent": random_adapter(tiny_bert(num_labels=2), 1, targets=BERT_LINEARS, task_type="seq-cls",
                                   labels=["neg", "pos"]),
            "topic": random_adapter(tiny_bert(num_labels=len(topic_labels)), 2, targets=BERT_LINEARS[::2],
                                    task_type="seq-cls", labels=list(topic_labels)),
            "feat": random_adapter(tiny_bert(), 3, targets=BERT_LINEARS, task_type="feature-extraction")}
