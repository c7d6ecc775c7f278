"""AdaLoRA runtime: SVD-form adapters, the rank allocator, compact adapter files.

The public surface for people with their own training loop (tests/test_layers.py runs this example)::

    adapters = inject_adapters(model, AdaLoraConfig(init_r=12, target_r=8, total_step=total_step))
    allocator = RankAllocator(adapters)
    optimizer = torch.optim.AdamW(adapters.trainable_parameters(), lr=1e-3)
    for step in range(total_step):
        loss = model(**batch).loss + adapters.config.orth_reg_weight * orth_penalty(adapters)
        loss.backward()
        optimizer.step()
        allocator.step(step)      # after backward (and optimizer.step), before zero_grad
        optimizer.zero_grad()
    save_adapter(adapters.export(allocator.masks), out)
"""

from adalora.config import AdaLoraConfig, ConfigError
from adalora.delta import apply_delta, delta_weight
from adalora.layers import SVDLinear
from adalora.inject import AdapterSet, inject_adapters
from adalora.allocator import RankAllocator, budget_schedule, keep_mask
from adalora.regularizer import orth_penalty
from adalora.adapter import Adapter, AdapterLayer
from adalora.adapter_file import AdapterFormatError, load_adapter, save_adapter

__all__ = [
    "AdaLoraConfig", "ConfigError", "apply_delta", "delta_weight", "SVDLinear", "AdapterSet",
    "inject_adapters", "RankAllocator", "budget_schedule", "keep_mask", "orth_penalty", "Adapter",
    "AdapterLayer", "AdapterFormatError", "load_adapter", "save_adapter",
]
