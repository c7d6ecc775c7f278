"""In-process multi-adapter serving: slots at each adapter's own per-layer rank, a batched apply with
per-token routing, edge mode (one adapter merged into the weights), and continuous-batching generation."""

from adalora_runtime.engine.apply import CostModel, Factors, batched_apply, choose_strategy
from adalora_runtime.engine.config import EngineConfig
from adalora_runtime.engine.edge import EdgeMerger
from adalora_runtime.engine.engine import AdapterEngine, Request
from adalora_runtime.engine.errors import (AdapterExists, AdapterMismatch, AdapterNotFound, BatchError, EngineError,
                                           InvalidRequest, SlotsFull)
from adalora_runtime.engine.multi_linear import BatchContext, MultiAdapterLinear, install_multi_linear
from adalora_runtime.engine.sampling import SamplingParams
from adalora_runtime.engine.scheduler import GenerationRequest, GenerationResult, Generator, GeneratorConfig, Handle
from adalora_runtime.engine.slots import AdapterSlots, SlotBank
from adalora_runtime.engine.stream import AsyncDriver, TokenStream

__all__ = ["AdapterEngine", "AdapterExists", "AdapterMismatch", "AdapterNotFound", "AdapterSlots", "AsyncDriver",
           "BatchContext", "BatchError", "CostModel", "EdgeMerger", "EngineConfig", "EngineError", "Factors",
           "GenerationRequest", "GenerationResult", "Generator", "GeneratorConfig", "Handle", "InvalidRequest",
           "MultiAdapterLinear", "Request", "SamplingParams", "SlotBank", "SlotsFull", "TokenStream", "batched_apply",
           "choose_strategy", "install_multi_linear"]
