"""In-process multi-adapter serving: slots at each adapter's own per-layer rank, a batched apply with
per-token routing, and edge mode (one adapter merged into the weights)."""

from adalora_runtime.engine.apply import CostModel, Factors, batched_apply, choose_strategy
from adalora_runtime.engine.config import EngineConfig
from adalora_runtime.engine.edge import EdgeMerger
from adalora_runtime.engine.engine import AdapterEngine, Request
from adalora_runtime.engine.errors import (AdapterExists, AdapterMismatch, AdapterNotFound, BatchError, EngineError,
                                           SlotsFull)
from adalora_runtime.engine.multi_linear import BatchContext, MultiAdapterLinear, install_multi_linear
from adalora_runtime.engine.slots import AdapterSlots, SlotBank

__all__ = ["AdapterEngine", "AdapterExists", "AdapterMismatch", "AdapterNotFound", "AdapterSlots", "BatchContext",
           "BatchError", "CostModel", "EdgeMerger", "EngineConfig", "EngineError", "Factors", "MultiAdapterLinear",
           "Request", "SlotBank", "SlotsFull", "batched_apply", "choose_strategy", "install_multi_linear"]
