"""Iteration-level (continuous) batching of generation requests over an AdapterEngine's causal LM.

    gen = Generator(engine, GeneratorConfig(max_batch_size=8))
    handle = gen.submit(GenerationRequest(prompt=[1, 5, 9], adapter="support", params=SamplingParams(temperature=0)))
    while gen.has_work():
        gen.step()
    handle.result  # GenerationResult(token_ids=[...], finish_reason='length', ...)

Each `step()`: (1) admits waiting requests up to max_batch_size and prefills them in one forward of the decoder
(prompts packed on the lean path, padded to the longest on the hf one), which also gives their first token; (2)
one decode forward of one token for every running row, each row with its own adapter through the engine's routing
context; (3) samples per row; (4) retires rows that finished (eos, stop sequence, max_new_tokens) so the others go
on without them.

Before (1), each step drops the requests `cancel()`led since the last one (waiting or running: the row and its
cache leave the batch) and, while admitting, every waiting request whose `deadline` (time.monotonic() seconds)
has passed; both end with an error (RequestCancelled, DeadlineExpired) and an expired request never runs.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from adalora.config import ConfigError, is_int
from adalora.engine.config import check_strategy
from adalora.engine.engine import AdapterEngine, Selection
from adalora.engine.errors import (DeadlineExpired, InvalidRequest, NonFiniteOutput,
                                           RequestCancelled)
from adalora.engine.kv import HfDecoder
from adalora.engine.lean import WEIGHTS, LeanLlama, unsupported
from adalora.engine.multi_linear import BatchContext
from adalora.engine.sampling import SamplingParams, next_token, request_generator

FINISH_REASONS = ("length", "stop", "eos")
DECODERS = ("auto", "lean", "hf")
"""The Generator's forward paths: 'lean' (engine.lean: Llama-family models), 'hf' (the transformers forward, any
causal LM with full attention), 'auto' = lean where it runs the model, else hf."""


@dataclass(frozen=True)
class GeneratorConfig:
    """Batching limits and stopping rules shared by every request of one Generator."""

    max_batch_size: int = 8
    """Rows decoded together; further requests wait until a row retires."""
    eos_token_ids: tuple[int, ...] | None = None
    """Tokens that end a completion (reason 'eos'); None = the model's generation_config eos ids, () = none."""
    strategy: str = "auto"
    """Batched-apply strategy of the adapters ('auto' = the engine's cost model)."""
    decoder: str = "auto"
    """The forward path (DECODERS): 'auto' takes the lean one where it runs the model."""
    weights: str = "float"
    """The lean path's dense weights (engine.lean.WEIGHTS): 'float' (the model's) or 'bf16' (a bfloat16 copy); CPU
    float32 with the native kernels, the lean decoder only."""
    cuda_graphs: bool = True
    """On CUDA, the lean decoder replays its decode steps from CUDA graphs over bucketed batch sizes
    (engine.graphs); False runs every step eagerly."""

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise ConfigError(f"unknown decoder {self.decoder!r}; choose one of {DECODERS}")
        if self.weights not in WEIGHTS:
            raise ConfigError(f"unknown weights {self.weights!r}; choose one of {WEIGHTS}")
        if self.weights != "float" and self.decoder == "hf":
            raise ConfigError(f"weights {self.weights!r} are the lean decoder's; decoder 'hf' runs the model's own")
        if not isinstance(self.cuda_graphs, bool):
            raise ConfigError(f"cuda_graphs must be True or False, got {self.cuda_graphs!r}")
        if not is_int(self.max_batch_size, 1):
            raise ConfigError(f"max_batch_size must be a positive integer, got {self.max_batch_size!r}")
        if self.eos_token_ids is not None and (not isinstance(self.eos_token_ids, tuple)
                                               or not all(is_int(t, 0) for t in self.eos_token_ids)):
            raise ConfigError(f"eos_token_ids must be a tuple of token ids (or None for the model's), "
                              f"got {self.eos_token_ids!r}")
        check_strategy(self.strategy)


@dataclass
class CompositionLife:
    """How many decode steps a running batch keeps its composition, and so each layer's plan ('auto' shares a
    plan's build over them: `BatchContext.calls`). A new composition is expected to live the fewest steps any
    of its rows may still run (1 when waiting requests join at the next step), and no longer than the running
    mean of the lives seen so far: rows also leave early (eos, a stop, a cancel) and requests arrive between
    steps."""

    weight: float = 0.25
    """Of the newest life in the running mean."""
    mean: float | None = None
    """Running mean of the observed lives in steps; None before the first ended."""

    def observe(self, steps: int) -> None:
        self.mean = float(steps) if self.mean is None else self.mean + self.weight * (steps - self.mean)

    def expect(self, bound: int) -> int:
        """Expected steps of a composition that cannot outlive `bound` steps."""
        return bound if self.mean is None else max(1, min(bound, round(self.mean)))


@dataclass(frozen=True)
class GenerationRequest:
    prompt: Sequence[int]
    """Token ids of the prompt (at least one)."""
    adapter: Selection = None
    """An adapter id, a weighted mixture {id: weight}, or None for the base model."""
    params: SamplingParams = SamplingParams()


@dataclass(frozen=True)
class GenerationResult:
    token_ids: list[int]
    """Generated ids (a stop sequence or eos token that ended it included)."""
    finish_reason: str
    """'length', 'stop' or 'eos'."""
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Handle:
    """What submit() returns: tokens so far, and the result once finished."""

    request_id: int
    request: GenerationRequest
    tokens: list[int] = field(default_factory=list)
    result: GenerationResult | None = None
    error: BaseException | None = None
    on_token: Callable[[int], None] | None = None
    on_finish: Callable[[Handle], None] | None = None
    deadline: float | None = None
    """time.monotonic() after which it may no longer be admitted; None = no deadline."""
    admitted_at: float | None = None
    """time.perf_counter() at the start of the step that admitted it (its prefill gave its first token); None
    while it waits."""

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None


@dataclass
class StepHooks:
    """What a serving layer wraps around each step and observes in it (the server's metrics and model lock). The
    observers run on the stepping thread, inside the step, with `lock` held."""

    lock: AbstractContextManager = field(default_factory=contextlib.nullcontext)
    """Held for the whole of each step: the server's model lock, so an adapter load waits for the step in progress."""
    on_admit: Callable[[Handle], None] = lambda handle: None
    """A request was admitted: its prefill gave its first token, not yet handed to its on_token (admitted_at set)."""
    on_decode: Callable[[int], None] = lambda rows: None
    """The step's decode forward ran over this many rows (one token each)."""


@dataclass
class _Row:
    """A running request: its handle, its own generator, prompt + completion ids (for penalties and stops)."""

    handle: Handle
    generator: torch.Generator
    seen: list[int]


class Generator:
    """Continuous batching over `engine.model` (a transformers causal LM with full-attention layers)."""

    def __init__(self, engine: AdapterEngine, config: GeneratorConfig = GeneratorConfig(), tokenizer=None,
                 hooks: StepHooks | None = None) -> None:
        model = engine.model
        self.hooks = hooks or StepHooks()
        self._step_started = time.perf_counter()
        self.engine, self.config, self.tokenizer = engine, config, tokenizer
        self.decoder = make_decoder(engine, config)
        eos = config.eos_token_ids
        if eos is None:
            eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
            eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        self.eos = frozenset(eos)
        self.vocab = model.config.get_text_config(decoder=True).vocab_size
        self.max_positions = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._waiting: deque[Handle] = deque()
        self._cancelled: set[int] = set()
        """request_id of each handle cancel()led since the last step began."""
        self._rows: list[_Row] = []
        self._pending: torch.Tensor | None = None
        """(B,) long: each running row's last sampled token, not yet in the cache."""
        self._decode_context: tuple[tuple, BatchContext] | None = None
        """(key, context) of the last decode step: reused, with the layers' plans it holds, while the key
        (the running requests in order, and the engine's load/unload count) stays the same."""
        self._decode_steps = 0
        """Decode steps run with the context of `_decode_context`."""
        self.life = CompositionLife()

    # ---- requests -------------------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, on_token: Callable[[int], None] | None = None,
               on_finish: Callable[[Handle], None] | None = None, deadline: float | None = None) -> Handle:
        """Validate `request` and queue it; `on_token(id)` runs for each generated token, `on_finish(handle)`
        once at the end (both on the thread that calls step()). A request still waiting at time.monotonic()
        `deadline` is dropped unrun (DeadlineExpired)."""
        self._check(request)
        handle = Handle(next(self._ids), request, on_token=on_token, on_finish=on_finish, deadline=deadline)
        with self._lock:
            self._waiting.append(handle)
        return handle

    def _check(self, request: GenerationRequest) -> None:
        if not isinstance(request, GenerationRequest):
            raise InvalidRequest(f"submit a GenerationRequest, got {type(request).__name__}")
        if not isinstance(request.params, SamplingParams):
            raise InvalidRequest(f"params must be SamplingParams, got {type(request.params).__name__}")
        prompt = request.prompt
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence) or len(prompt) == 0:
            raise InvalidRequest("prompt must be a non-empty sequence of token ids; tokenize text first")
        bad = [t for t in prompt if not is_int(t, 0, self.vocab - 1)]
        if bad:
            raise InvalidRequest(f"prompt token ids must be integers in [0, {self.vocab}), got {bad[:5]!r}")
        total = len(prompt) + request.params.max_new_tokens
        if self.max_positions is not None and total > self.max_positions:
            raise InvalidRequest(f"prompt ({len(prompt)} tokens) + max_new_tokens ({request.params.max_new_tokens}) "
                                 f"= {total} exceeds the model's {self.max_positions} positions; shorten one of them")
        if request.params.stop_strings() and self.tokenizer is None:
            raise InvalidRequest(f"stop strings {request.params.stop_strings()!r} need a tokenizer: create the "
                                 f"Generator with tokenizer=..., or give stop sequences as token ids")
        self.engine.check(request.adapter)  # AdapterNotFound / BatchError

    def cancel(self, handle: Handle) -> None:
        """End `handle` at the next step boundary (thread-safe): it leaves the queue or frees its row, and
        finishes with RequestCancelled. A handle already done is left as it is."""
        with self._lock:
            if not handle.done:
                self._cancelled.add(handle.request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._rows)

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet admitted to the batch."""
        with self._lock:
            return len(self._waiting)

    # ---- one iteration --------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[Handle]:
        """Drop cancelled requests, admit + prefill waiting ones, decode one token for every running row;
        returns finished handles (dropped ones included)."""
        with self.hooks.lock:
            self._step_started = time.perf_counter()
            finished = self._drop_cancelled()
            finished += self._admit()
            if self._rows:
                rows = len(self._rows)
                logits = self._decode()  # (B, V)
                finished += self._sample_and_retire(logits)
                self.hooks.on_decode(rows)
            return finished

    def _drop_cancelled(self) -> list[Handle]:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            if not cancelled:
                return []
            waiting = [h for h in self._waiting if h.request_id in cancelled]
            self._waiting = deque(h for h in self._waiting if h.request_id not in cancelled)
        keep = [i for i, r in enumerate(self._rows) if r.handle.request_id not in cancelled]
        running = [r.handle for r in self._rows if r.handle.request_id in cancelled]
        if running:
            self._rows = [self._rows[i] for i in keep]
            self.decoder.keep(keep)
            self._pending = self._pending[keep] if keep else None
        return [self._fail(h, RequestCancelled(f"request {h.request_id} was cancelled by its caller after "
                                                f"{len(h.tokens)} tokens")) for h in running + waiting]

    def _take_waiting(self) -> tuple[list[Handle], list[Handle]]:
        """(requests to admit, up to the free rows; expired requests taken off the queue unrun)."""
        now, new, expired = time.monotonic(), [], []
        with self._lock:
            free = self.config.max_batch_size - len(self._rows)
            while self._waiting and len(new) < free:
                handle = self._waiting.popleft()
                (expired if handle.deadline is not None and handle.deadline <= now else new).append(handle)
        return new, expired

    def _admit(self) -> list[Handle]:
        new, expired = self._take_waiting()
        dropped = [self._fail(h, DeadlineExpired(f"request {h.request_id} waited past its deadline for a batch "
                                                  f"row and was not started; allow a longer deadline or retry "
                                                  f"when the server is less busy")) for h in expired]
        if not new:
            return dropped
        try:
            rows = [_Row(h, request_generator(h.request.params.seed), list(h.request.prompt)) for h in new]
            tokens = self.decoder.prefill_tokens([len(r.seen) for r in rows])  # packed (lean) or padded (hf)
            context = self.engine.context([h.request.adapter for h in new], tokens, self.config.strategy)
            with self.engine.batch(context):
                logits = self.decoder.prefill([r.seen for r in rows])  # (n, V)
        except BaseException as error:  # off the queue and not in a row yet: fail_all would never end them
            for handle in new:
                self._fail(handle, error)
            raise
        first = len(self._rows)
        self._rows += rows
        return dropped + self._sample_and_retire(logits, first)

    def _decode_routing(self) -> BatchContext:
        """The decode context of the running rows: the previous step's while neither the rows nor the loaded
        adapters changed, so each layer's plan is built once per batch composition."""
        key = (tuple(r.handle.request_id for r in self._rows), self.engine.slots.version)
        if self._decode_context is None or self._decode_context[0] != key:
            if self._decode_context is not None:
                self.life.observe(self._decode_steps)
            context = self.engine.context([r.handle.request.adapter for r in self._rows], 1, self.config.strategy,
                                          self._expected_steps())
            self._decode_context, self._decode_steps = (key, context), 0
        self._decode_steps += 1
        return self._decode_context[1]

    def _expected_steps(self) -> int:
        """Decode steps the running rows are expected to stay together (CompositionLife)."""
        with self._lock:
            joining = bool(self._waiting) and len(self._rows) < self.config.max_batch_size
        if joining:
            return 1
        return self.life.expect(min(r.handle.request.params.max_new_tokens - len(r.handle.tokens) for r in self._rows))

    def _decode(self) -> torch.Tensor:
        context = self._decode_routing()
        with self.engine.batch(context):
            return self.decoder.decode(self._pending)  # (B, V)

    def _sample_and_retire(self, logits: torch.Tensor, first: int = 0) -> list[Handle]:
        """Sample rows first.. from logits (B - first, V); drop finished rows from rows, cache and pending."""
        tokens: list[int] = []
        failed: dict[int, NonFiniteOutput] = {}
        finite = torch.isfinite(logits).all(dim=-1).tolist()  # (B - first,): one sync for the whole batch
        for i, (row, row_logits) in enumerate(zip(self._rows[first:], logits, strict=True)):
            try:
                if not finite[i]:
                    raise NonFiniteOutput("the model's logits for this request are NaN or infinite: its adapter or "
                                          "mix overflows this model; lower the mix weights or check the adapter")
                tokens.append(next_token(row_logits, self._seen(row, row_logits.device), row.handle.request.params,
                                         row.generator))
            except NonFiniteOutput as e:  # this row alone fails; the others sample as if it were not there
                failed[i] = NonFiniteOutput(f"request {row.handle.request_id}, token {len(row.handle.tokens)}: {e}")
                tokens.append(0)
        new = torch.tensor(tokens, dtype=torch.long, device=self.engine.device)
        self._pending = new if first == 0 or self._pending is None else torch.cat([self._pending, new])
        finished, keep = [], list(range(first))
        for index, (row, token) in enumerate(zip(self._rows[first:], tokens), start=first):
            if index - first in failed:
                finished.append(self._fail(row.handle, failed[index - first]))
                continue
            reason = self._emit(row, token)
            if reason is None:
                keep.append(index)
            else:
                finished.append(self._finish(row.handle, reason))
        if len(keep) < len(self._rows):
            self._rows = [self._rows[i] for i in keep]
            self.decoder.keep(keep)
            self._pending = self._pending[keep] if keep else None
        return finished

    @staticmethod
    def _seen(row: _Row, device: torch.device) -> torch.Tensor:
        """(S,) the row's prompt + completion ids, when its repetition penalty reads them (else empty: no copy)."""
        if row.handle.request.params.repetition_penalty == 1.0:
            return torch.empty(0, dtype=torch.long, device=device)
        return torch.tensor(row.seen, dtype=torch.long, device=device)

    def _emit(self, row: _Row, token: int) -> str | None:
        """Record one token; returns the finish reason if it ends the completion."""
        row.seen.append(token)
        row.handle.tokens.append(token)
        if row.handle.admitted_at is None:  # its first token: the prefill of the step that admitted it
            row.handle.admitted_at = self._step_started
            self.hooks.on_admit(row.handle)
        if row.handle.on_token is not None:
            row.handle.on_token(token)
        if token in self.eos and not row.handle.request.params.ignore_eos:
            return "eos"
        if self._stopped(row.handle.tokens, row.handle.request.params):
            return "stop"
        if len(row.handle.tokens) >= row.handle.request.params.max_new_tokens:
            return "length"
        return None

    def _stopped(self, completion: list[int], params: SamplingParams) -> bool:
        for ids in params.stop_ids():
            if len(completion) >= len(ids) and tuple(completion[-len(ids):]) == ids:
                return True
        strings = params.stop_strings()
        if not strings:
            return False
        # a stop string that ends inside the newest token starts at most len(text) tokens back (a token decodes to
        # at least one character, byte fragments aside): one decode of the longest such tail serves them all
        tail = self.tokenizer.decode(completion[-(max(map(len, strings)) + 1):])
        return any(text in tail for text in strings)

    def _finish(self, handle: Handle, reason: str) -> Handle:
        handle.result = GenerationResult(list(handle.tokens), reason, len(handle.request.prompt), len(handle.tokens))
        if handle.on_finish is not None:
            handle.on_finish(handle)
        return handle

    def fail_all(self, error: BaseException) -> list[Handle]:
        """End every waiting and running request with `error` (after a step raised); the batch starts empty."""
        with self._lock:
            handles = [*(r.handle for r in self._rows), *self._waiting]
            self._waiting.clear()
            self._cancelled.clear()
        self._rows, self._pending, self._decode_context = [], None, None
        self.decoder.clear()
        return [self._fail(handle, error) for handle in handles]

    def _fail(self, handle: Handle, error: BaseException) -> Handle:
        handle.error = error
        if handle.on_finish is not None:
            handle.on_finish(handle)
        return handle


def make_decoder(engine: AdapterEngine, config: GeneratorConfig) -> HfDecoder | LeanLlama:
    """The forward path `config.decoder` names over the engine's model ('auto': lean where it runs the model)."""
    if config.decoder == "hf" or (config.decoder == "auto" and unsupported(engine.model) is not None
                                  and config.weights == "float"):
        return HfDecoder(engine.model)
    return LeanLlama(engine.model, engine.holder, config.max_batch_size, config.weights, config.cuda_graphs)
