"""In-process multi-adapter serving: slots at each adapter's own per-layer rank, a batched apply with
per-token routing, edge mode (one adapter merged into the weights), continuous-batching generation, and
encoder serving (per-adapter classification heads, mean-pooled embeddings)."""

from adalora_runtime.engine.apply import CostModel, Factors, batched_apply, choose_strategy
from adalora_runtime.engine.config import EngineConfig
from adalora_runtime.engine.edge import EdgeMerger
from adalora_runtime.engine.encoder import Classification, EncodedBatch, EncoderRunner, encode, from_token_ids
from adalora_runtime.engine.engine import AdapterEngine, Request
from adalora_runtime.engine.errors import (AdapterExists, AdapterMismatch, AdapterNotFound, BatchError,
                                           DeadlineExpired, EngineError, InvalidRequest, RequestCancelled,
                                           SlotsFull)
from adalora_runtime.engine.heads import Head, HeadBank
from adalora_runtime.engine.multi_linear import BatchContext, MultiAdapterLinear, install_multi_linear
from adalora_runtime.engine.sampling import SamplingParams
from adalora_runtime.engine.scheduler import GenerationRequest, GenerationResult, Generator, GeneratorConfig, Handle
from adalora_runtime.engine.slots import AdapterSlots, SlotBank
from adalora_runtime.engine.stream import AsyncDriver, TokenStream

__all__ = ["AdapterEngine", "AdapterExists", "AdapterMismatch", "AdapterNotFound", "AdapterSlots", "AsyncDriver",
           "BatchContext", "BatchError", "Classification", "CostModel", "DeadlineExpired", "EdgeMerger", "EncodedBatch",
           "EncoderRunner", "EngineConfig", "EngineError", "Factors", "GenerationRequest", "GenerationResult",
           "Generator", "GeneratorConfig", "Handle", "Head", "HeadBank", "InvalidRequest", "MultiAdapterLinear",
           "Request", "RequestCancelled", "SamplingParams", "SlotBank", "SlotsFull", "TokenStream", "batched_apply",
           "choose_strategy", "encode", "from_token_ids", "install_multi_linear"]
