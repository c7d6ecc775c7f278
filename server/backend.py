"""The serving runtime behind the gRPC servicer: one base model, its AdapterEngine, a Generator (causal LM)
or an EncoderRunner (encoder), and the adapter store. Domain objects in and out; no protobuf here.

Threads: the model only runs under `lock`, on the generation driver's thread (one step at a time) or on a
worker thread (encoder forwards, adapter slot writes), so an adapter load never lands inside a forward.
Everything else (which adapter is in which tier, requests in flight) runs on the asyncio loop; where adapters
live and move is server.residency's job: every request acquires its adapters there (loading them on demand).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path

import torch
from jinja2 import TemplateError
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from adalora.adapter import is_causal_lm
from adalora.config import is_int
from adalora.engine import (AdapterEngine, AsyncDriver, Classification, EncoderRunner, EngineConfig,
                            GenerationRequest, Generator, GeneratorConfig, StepHooks, TokenStream, native)
from adalora.engine.engine import Selection
from adalora.engine.errors import AdapterExists, DeadlineExpired, EngineError, InvalidRequest
from adalora.dtypes import DTYPES
from adalora.dtypes import resolve as resolve_dtype
from adalora.server import upload
from adalora.server.config import ServerConfig
from adalora.server.errors import QueueFull, StoreError, WrongModelKind
from adalora.server.locks import FairLock
from adalora.server.metrics import Metrics
from adalora.server.residency import Budget, Events, Residency, Resident
from adalora.server.domain import (AdapterView, Completion, EncodeCall, GenerateCall, Timings, TokenDelta,
                                   adapter_ids)
from adalora.server.store import AdapterStore, check_id

CHARS_PER_TOKEN = 32
"""A text longer than this many characters per token of the request's limit is refused before tokenizing: real
tokenizers average 3-5 characters a token, so such a text would exceed the token limit anyway."""
MODEL_CLASSES = {"causal-lm": AutoModelForCausalLM, "encoder": AutoModelForSequenceClassification}
"""How a base model folder is loaded, by kind: a causal LM generates, anything else is served as an encoder."""


def model_kind(config) -> str:
    """'causal-lm' when the folder's architectures name a causal LM class (adapter.is_causal_lm), else 'encoder'."""
    return "causal-lm" if is_causal_lm(config) else "encoder"


log = logging.getLogger("adalora.server")


# ---- the backend --------------------------------------------------------------------------------------------

def load_base(config: ServerConfig) -> tuple[torch.nn.Module, object | None]:
    """(model in eval mode on config.device, tokenizer or None) from the base model folder."""
    folder = Path(config.base_model)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--base-model {folder}: not a model folder (no config.json); run `adalora prepare` "
                                f"or pass a transformers model folder")
    kind = model_kind(AutoConfig.from_pretrained(folder, local_files_only=True))
    dtype = resolve_dtype(config.dtype, config.device)
    if config.dtype == "auto":
        log.info("--dtype auto: %s on %s", dtype, config.device)
    model = MODEL_CLASSES[kind].from_pretrained(folder, local_files_only=True, dtype=DTYPES[dtype])
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError):  # no tokenizer files: the server takes token ids only
        tokenizer = None
    return model.to(config.device).eval(), tokenizer


class Backend:
    """One base model serving the store's adapters; create with Backend.open(config) (slow: reads the model)."""

    def __init__(self, model: torch.nn.Module, tokenizer, config: ServerConfig, store: AdapterStore,
                 metrics: Metrics | None = None) -> None:
        self.config, self.tokenizer, self.store = config, tokenizer, store
        self.metrics = Metrics(config.max_slots, config.max_batch_size) if metrics is None else metrics
        self.metrics.watch_store(store)
        self.kind = model_kind(model.config)
        if config.device == "cpu":  # built here, at start, never inside a first request
            why = native.unavailable()
            log.info("CPU kernels: %s", "native (engine/native.cpp)" if why is None else f"PyTorch's ({why})")
        if self.kind != "causal-lm" and config.weights != "float":
            raise EngineError(f"--weights {config.weights} is the lean decoder's, for a causal LM; this base is an "
                              f"encoder ({type(model).__name__}): serve it with --weights float")
        self.engine = AdapterEngine(model, EngineConfig(max_slots=config.max_slots))
        self.lock = FairLock()
        """The model lock, first come first served: an adapter load waits one engine step at most."""
        m = self.metrics
        events = Events(hit=m.cache_hits.inc, miss=m.cache_misses.inc, evicted=m.evictions.inc,
                        loaded=m.load_seconds.observe, changed=self._adapters_changed)
        budget = Budget(config.max_slots, config.max_device_bytes, config.max_host_bytes)
        self.residency = Residency(self.engine, store, self.lock, budget, events)
        self._admin = asyncio.Lock()
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.generator: Generator | None = None
        self.driver: AsyncDriver | None = None
        self.runner: EncoderRunner | None = None
        if self.kind == "causal-lm":
            hooks = StepHooks(lock=self.lock, on_admit=lambda handle: m.inflight.admitted(id(handle.request)),
                              on_decode=m.batch_size.observe)
            self.generator = Generator(self.engine, GeneratorConfig(max_batch_size=config.max_batch_size,
                                                                    decoder=config.decoder, weights=config.weights,
                                                                    cuda_graphs=config.cuda_graphs),
                                       tokenizer, hooks)
            graphs = getattr(self.generator.decoder, "graphs", None) is not None
            log.info("generation decoder: %s (--decoder %s, --weights %s, CUDA graphs %s)",
                     self.generator.decoder.name, config.decoder, config.weights, "on" if graphs else "off")
            self.driver = AsyncDriver(self.generator, gather_s=config.gather_ms / 1000)
        else:
            limit = min(config.max_prompt_tokens, self.max_positions or config.max_prompt_tokens)
            self.runner = EncoderRunner(self.engine, tokenizer, max_length=limit)

    @classmethod
    def open(cls, config: ServerConfig, metrics: Metrics | None = None) -> Backend:
        """Read the base model and load config.preload from the store (blocking: run it off the event loop);
        record into `metrics` (the Server's), or into a Metrics of its own."""
        store = AdapterStore(config.adapter_dir, config.base_model, config.adapter_limits,
                             max_bytes=config.max_store_bytes, max_uploads=config.max_concurrent_uploads)
        model, tokenizer = load_base(config)
        backend = cls(model, tokenizer, config, store, metrics)
        for adapter_id in config.preload:
            backend.residency.preload(store.read(check_id(adapter_id)))
        backend._adapters_changed()
        return backend

    def close(self) -> None:
        if self.driver is not None:
            self.driver.close()

    def _require(self, kind: str, rpc: str) -> None:
        if self.kind != kind:
            other = {"causal-lm": "Generate / GenerateStream", "encoder": "Classify / Embed"}[self.kind]
            article = {"causal-lm": "a", "encoder": "an"}
            raise WrongModelKind(f"{rpc} needs {article[kind]} {kind} base model, but this server serves "
                                 f"{article[self.kind]} {self.kind} base "
                                 f"({self.config.base_model}); use {other}")

    async def _acquire(self, request: Selection, deadline: float | None) -> tuple[Selection, list[Resident]]:
        """(the request with each adapter id replaced by the engine key of the version it runs, the residents
        to release when it ends); loads what is not on the device."""
        if request is None:
            return None, []
        held = await self.residency.acquire(adapter_ids(request), deadline)  # the ids were checked at the boundary
        if isinstance(request, str):
            return held[request].key, list(held.values())
        return {held[i].key: w for i, w in request.items()}, list(held.values())

    # ---- generation -----------------------------------------------------------------------------------------

    def _check_text_size(self, text: str, what: str, max_tokens: int) -> None:
        """Bound a text before the tokenizer sees it (tokenizing megabytes takes seconds), and refuse one that is not
        valid Unicode (a lone surrogate, which JSON can carry; the tokenizer would raise)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRequest(f"{what} is not valid Unicode (character {e.start} is a lone surrogate); send "
                                 f"UTF-8 text") from None
        if len(text) > max_tokens * CHARS_PER_TOKEN:
            raise InvalidRequest(f"{what} has {len(text)} characters, over this server's limit of "
                                 f"{max_tokens * CHARS_PER_TOKEN} ({CHARS_PER_TOKEN} per token of the "
                                 f"{max_tokens}-token limit); shorten it")

    async def _prompt_ids(self, prompt: str | tuple[int, ...]) -> list[int]:
        """Token ids of a prompt: a text is bounded, then tokenized off the event loop."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequest("this server's base model has no tokenizer; send the prompt as token_ids")
            self._check_text_size(prompt, "the prompt", self.config.max_prompt_tokens)
            ids = list((await asyncio.to_thread(self.tokenizer, prompt))["input_ids"])
            if not ids:
                raise InvalidRequest("the prompt text has no tokens (it is empty or only whitespace); send some text")
        else:
            ids = list(prompt)
        if len(ids) > self.config.max_prompt_tokens:
            raise InvalidRequest(f"the prompt has {len(ids)} tokens, over this server's limit of "
                                 f"{self.config.max_prompt_tokens} (--max-prompt-tokens); shorten it")
        return ids

    async def chat_prompt(self, messages: list[dict[str, str]]) -> tuple[int, ...]:
        """Token ids of chat messages ({"role", "content"}) rendered by the tokenizer's chat template, ending with the
        assistant's turn; bounded as a prompt text is."""
        template = None if self.tokenizer is None else getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise InvalidRequest(f"the base model ({Path(self.config.base_model).name}) has no chat template; use "
                                 f"/v1/completions with a prompt")
        self._check_text_size("".join(m["content"] for m in messages), "the messages", self.config.max_prompt_tokens)

        def render() -> list[int]:
            out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(out["input_ids"] if isinstance(out, Mapping) else out)

        try:
            ids = await asyncio.to_thread(render)
        except (TemplateError, ValueError, TypeError, KeyError) as e:  # the template refused these messages
            raise InvalidRequest(f"the chat template cannot render these messages: {e}") from e
        return tuple(await self._prompt_ids(tuple(ids)))

    async def count_tokens(self, inputs: Sequence[str | Sequence[int]]) -> int:
        """Tokens of encoder inputs as the model reads them (texts truncated at its limit), for usage counts."""
        limit = self.runner.max_length if self.runner is not None else self.config.max_prompt_tokens

        def count() -> int:
            return sum(len(x) if not isinstance(x, str) else
                       min(len(self.tokenizer(x)["input_ids"]), limit) for x in inputs)

        return await asyncio.to_thread(count)

    def decode(self, token_ids: Sequence[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    async def generate(self, call: GenerateCall) -> AsyncIterator[TokenDelta | Completion]:
        """Yields a TokenDelta per generated token, then one Completion. Every refusal raises before the
        first yield; a request still waiting at call.deadline ends with DeadlineExpired, never having run. A
        consumer that stops early (a cancelled RPC) cancels the request: its batch row is freed at the next step."""
        received = time.perf_counter()
        self._require("causal-lm", "Generate")
        prompt = await self._prompt_ids(call.prompt)
        self._check_admission(call.deadline)
        ids, label = adapter_ids(call.adapter), self.metrics.adapter_label(call.adapter)
        keys, held = await self._acquire(call.adapter, call.deadline)
        request = GenerationRequest(prompt, keys, call.params)
        self.metrics.inflight.queued(id(request), ids)  # before submit: the driver thread may admit it at once
        try:
            stream = self.driver.stream(request, call.deadline)  # validation errors raise here
        except Exception:
            self.metrics.inflight.finished(id(request))
            self.residency.release(held)
            raise
        done = False
        try:
            tokens: list[int] = []
            text, first = "", None
            async for token in stream:
                first = first or time.perf_counter()
                tokens.append(token)
                full = self.decode(tokens)
                delta = ""
                if full.startswith(text) and not full.endswith("\ufffd"):
                    delta, text = full[len(text):], full
                yield TokenDelta(token, delta)
            end = time.perf_counter()
            result = stream.result
            admitted = stream.handle.admitted_at or received
            ms = lambda t: (t - received) * 1e3  # noqa: E731
            self.metrics.generation_timed(label, admitted - received, (first or end) - received, end - received,
                                          len(tokens))
            done = True
            yield Completion(self.decode(tokens), tokens, result.finish_reason, result.prompt_tokens,
                             result.completion_tokens, Timings(ms(admitted), ms(first or end), ms(end)))
        finally:
            if done or stream.handle.done:
                self._release(stream, request, held, label)
            else:
                self.driver.cancel(stream)
                asyncio.ensure_future(self._release_when_dropped(stream, request, held, label))

    async def complete(self, call: GenerateCall) -> Completion:
        """The Completion of `call` (generate without the token events); refusals raise as generate's do."""
        async with contextlib.aclosing(self.generate(call)) as events:
            async for event in events:
                if isinstance(event, Completion):
                    return event
        raise RuntimeError("a generation ended without its completion")

    def _check_admission(self, deadline: float | None) -> None:
        if deadline is not None and deadline <= time.monotonic():
            raise DeadlineExpired("the request's deadline passed before it could be queued; allow a longer "
                                  "deadline")
        waiting = self.generator.waiting + self.residency.acquiring
        if waiting >= self.config.max_queue:
            raise QueueFull(f"{waiting} generation requests already wait for a batch row, this server's limit "
                            f"(--max-queue {self.config.max_queue}); back off and retry, or raise --max-queue or "
                            f"--max-batch-size")

    async def _release_when_dropped(self, stream: TokenStream, request: GenerationRequest, held: list[Resident],
                                    label: str) -> None:
        """A cancelled request holds its adapters until the generator has dropped it (the next step)."""
        try:
            async for _ in stream:
                pass
        except Exception:  # noqa: BLE001 - nobody is left to tell
            pass
        finally:
            self._release(stream, request, held, label)

    def _release(self, stream: TokenStream, request: GenerationRequest, held: list[Resident], label: str) -> None:
        self.metrics.generation_finished(id(request), label, stream.result)
        self.residency.release(held)

    # ---- encoder --------------------------------------------------------------------------------------------

    def _encoder_inputs(self, call: EncodeCall) -> list:
        if len(call.inputs) > self.config.max_inputs:
            raise InvalidRequest(f"{len(call.inputs)} inputs, over this server's limit of {self.config.max_inputs} "
                                 f"per request; split them into several requests")
        limit = self.runner.max_length
        for i, x in enumerate(call.inputs):
            if isinstance(x, str):
                self._check_text_size(x, f"input {i}", limit)
        long = [i for i, x in enumerate(call.inputs) if not isinstance(x, str) and len(x) > limit]
        if long:
            raise InvalidRequest(f"inputs {long[:5]} have more than {limit} token ids (this server's limit for "
                                 f"this base); shorten them")
        vocab = self.engine.model.config.vocab_size
        bad = [i for i, x in enumerate(call.inputs) if not isinstance(x, str) and not all(is_int(t, 0, vocab - 1)
                                                                                          for t in x)]
        if bad:
            raise InvalidRequest(f"inputs {bad[:5]} hold token ids outside [0, {vocab}) (this base's vocabulary); "
                                 f"send valid ids or text")
        return [x if isinstance(x, str) else list(x) for x in call.inputs]

    async def _encode(self, fn: Callable, call: EncodeCall, *args):
        """Run `fn(inputs, per-input keys, *args)` on the model with the call's adapters held."""
        inputs = self._encoder_inputs(call)
        keys, held = await self._acquire(call.adapter, None)
        try:
            return await asyncio.to_thread(self.lock.run, fn, inputs, [keys] * len(inputs), *args)
        finally:
            self.residency.release(held)

    async def classify(self, call: EncodeCall) -> list[Classification]:
        self._require("encoder", "Classify")
        return await self._encode(self.runner.classify, call)

    async def embed(self, call: EncodeCall) -> torch.Tensor:
        """(N, hidden) float32 on the CPU."""
        self._require("encoder", "Embed")
        return (await self._encode(self.runner.embed, call, call.normalize)).cpu()

    # ---- adapters -------------------------------------------------------------------------------------------

    def _adapters_changed(self) -> None:
        r = self.residency
        self.metrics.adapters_changed(r.device, r.host, r.device_bytes)

    async def load_adapter(self, adapter_id: str, reload: bool = False,
                           pin: bool = False) -> tuple[AdapterView, bool, float]:
        """(the loaded adapter, whether this version was already loaded, milliseconds spent). A reload places
        the new version beside the old one: requests already holding the old one finish on it."""
        async with self._admin:
            start = time.perf_counter()
            check_id(adapter_id)
            current = self.residency.device.get(adapter_id)
            version = await asyncio.to_thread(self.store.version, adapter_id)
            if current is not None and current.stored.version == version:
                current.pinned = current.pinned or pin
                self.metrics.cache_hits.inc()
                return self.view(adapter_id), True, 0.0
            if current is not None and not reload:
                raise AdapterExists(f"adapter {adapter_id!r} is loaded at version {current.stored.version[:12]}, "
                                    f"and the store now holds version {version[:12]}; pass reload=true to replace "
                                    f"it")
            stored = self.residency.host.get(adapter_id)
            if stored is None or stored.version != version:
                stored = await asyncio.to_thread(self.store.read, adapter_id)
            await self.residency.place(stored, pin, started=start)
            return self.view(adapter_id), False, (time.perf_counter() - start) * 1e3

    async def unload_adapter(self, adapter_id: str) -> int:
        """Device bytes freed (at once, or when the requests still running with it end)."""
        async with self._admin:
            check_id(adapter_id)
            return await self.residency.unload(adapter_id)

    def view(self, adapter_id: str) -> AdapterView:
        """An adapter on the device or in host memory (KeyError otherwise)."""
        resident = self.residency.device.get(adapter_id)
        if resident is not None:
            return AdapterView(adapter_id, "device", resident.stored.format, resident.stored, resident.device_bytes,
                               resident.pinned, resident.users)
        stored = self.residency.host[adapter_id]
        return AdapterView(adapter_id, "host", stored.format, stored)

    async def get_adapter(self, adapter_id: str) -> AdapterView:
        check_id(adapter_id)
        if self.residency.tier(adapter_id) != "disk":
            return self.view(adapter_id)
        stored = await asyncio.to_thread(self.store.read, adapter_id)
        return AdapterView(adapter_id, "disk", stored.format, stored)

    def list_adapters(self, include_store: bool = False) -> list[AdapterView]:
        """Device adapters by id, then host ones, then (include_store) the store's others."""
        r = self.residency
        views = [self.view(i) for i in sorted(r.device)] + [self.view(i) for i in sorted(r.host)]
        if include_store:
            for adapter_id in self.store.ids():
                if r.tier(adapter_id) == "disk":
                    views.append(AdapterView(adapter_id, "disk", self._format_or_blank(adapter_id), None))
        return views

    async def list_with_store(self) -> list[AdapterView]:
        """list_adapters(include_store=True) for a handler on the event loop: the device and host views are read
        here, on the loop that changes them; only the store's folder names and formats are read on a thread."""
        loaded = self.list_adapters()
        stored = await asyncio.to_thread(lambda: [(i, self._format_or_blank(i)) for i in self.store.ids()])
        return loaded + [AdapterView(i, "disk", fmt, None) for i, fmt in stored if self.residency.tier(i) == "disk"]

    async def upload_adapter(self, header: upload.UploadHeader,
                             chunks: AsyncIterator[tuple[str, bytes]]) -> tuple[AdapterView, bool]:
        """Store an uploaded adapter (server.upload) if this base can serve it; it is not loaded. Returns (its view,
        whether it replaced a stored version): the device or host view when this very version is there, else disk."""
        stored, replaced = await upload.receive(self.store, header, chunks, self.config.max_upload_bytes,
                                                self.engine.slots)
        self.residency.stored_anew(stored)
        try:
            held = self.view(stored.id)
        except KeyError:  # not loaded
            held = None
        if held is not None and held.stored.version == stored.version:
            return held, replaced
        return AdapterView(stored.id, "disk", stored.format, stored), replaced

    def _format_or_blank(self, adapter_id: str) -> str:
        try:
            return self.store.format(adapter_id)
        except StoreError:  # an unreadable folder is listed with no format
            return ""
