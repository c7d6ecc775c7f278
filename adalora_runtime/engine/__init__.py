"""In-process multi-adapter serving: slots at each adapter's own per-layer rank, a batched apply with
per-token routing, edge mode (one adapter merged into the weights), continuous-batching generation, and
encoder serving (per-adapter classification heads, mean-pooled embeddings)."""

from adalora.engine.apply import Factors, batched_apply
from adalora.engine.cost import CostModel, choose_strategy
from adalora.engine.config import EngineConfig
from adalora.engine.edge import EdgeMerger
from adalora.engine.encoder import Classification, EncodedBatch, EncoderRunner, encode, from_token_ids
from adalora.engine.engine import AdapterEngine, Selection
from adalora.engine.errors import (AdapterExists, AdapterMismatch, AdapterNotFound, BatchError,
                                           DeadlineExpired, EngineError, InvalidRequest, RequestCancelled,
                                           SlotsFull)
from adalora.engine.heads import Head, HeadBank
from adalora.engine.multi_linear import BatchContext, MultiAdapterLinear, install_multi_linear
from adalora.engine.sampling import SamplingParams
from adalora.engine.scheduler import GenerationRequest, GenerationResult, Generator, GeneratorConfig, Handle, StepHooks
from adalora.engine.slots import AdapterSlots, SlotBank
from adalora.engine.stream import AsyncDriver, TokenStream

__all__ = ["AdapterEngine", "AdapterExists", "AdapterMismatch", "AdapterNotFound", "AdapterSlots", "AsyncDriver",
           "BatchContext", "BatchError", "Classification", "CostModel", "DeadlineExpired", "EdgeMerger", "EncodedBatch",
           "EncoderRunner", "EngineConfig", "EngineError", "Factors", "GenerationRequest", "GenerationResult",
           "Generator", "GeneratorConfig", "Handle", "Head", "HeadBank", "StepHooks", "InvalidRequest", "MultiAdapterLinear",
           "Selection", "RequestCancelled", "SamplingParams", "SlotBank", "SlotsFull", "TokenStream", "batched_apply",
           "choose_strategy", "encode", "from_token_ids", "install_multi_linear"]
