"""AdaLoRA runtime: SVD-form adapters, the rank allocator, compact adapter files.

The public surface for people with their own training loop::

    adapters = inject_adapters(model, AdaLoraConfig(init_r=12, target_r=8, total_step=1000))
    allocator = RankAllocator(adapters, adapters.config)
    for step in range(total_step):
        loss = model(**batch).loss + adapters.config.orth_reg_weight * orth_penalty(adapters)
        loss.backward()
        optimizer.step()
        allocator.step(step)      # after backward, before zero_grad
        optimizer.zero_grad()
    save_adapter(adapters.export(allocator), "out/")
"""

from adalora_runtime.config import AdaLoraConfig, ConfigError
from adalora_runtime.delta import apply_delta, delta_weight
from adalora_runtime.layers import SVDLinear
from adalora_runtime.inject import AdapterSet, inject_adapters
from adalora_runtime.allocator import RankAllocator, budget_schedule, keep_mask
from adalora_runtime.regularizer import orth_penalty
from adalora_runtime.adapter import Adapter, AdapterLayer
from adalora_runtime.adapter_file import AdapterFormatError, load_adapter, save_adapter

__all__ = [
    "AdaLoraConfig", "ConfigError", "apply_delta", "delta_weight", "SVDLinear", "AdapterSet",
    "inject_adapters", "RankAllocator", "budget_schedule", "keep_mask", "orth_penalty", "Adapter",
    "AdapterLayer", "AdapterFormatError", "load_adapter", "save_adapter",
]
