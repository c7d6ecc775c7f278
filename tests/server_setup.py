"""Helpers of the server tests: a real word-level tokenizer built in code, base model and adapter store folders,
and an in-process grpc.aio server on port 0 running on its own event-loop thread (so tests use blocking stubs)."""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from pathlib import Path

import grpc
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from adalora.adapter_file import save_adapter
from adalora.engine import AdapterEngine, EncoderRunner, EngineConfig
from adalora.server.app import create_server
from adalora.server.backend import Backend
from adalora.server.client import AdaLoraClient
from adalora.server.config import ServerConfig

SPECIALS = ["[PAD]", "[UNK]", "</s>", "[CLS]", "[SEP]"]


def word_tokenizer(vocab_size: int = 64) -> PreTrainedTokenizerFast:
    """Whitespace words w5..w63 over the tiny models' 64-token vocabulary; id 2 = '</s>' (Llama's default eos)."""
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   eos_token="</s>", cls_token="[CLS]", sep_token="[SEP]")


def write_base(model, folder: Path, tokenizer=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def write_store(folder: Path, adapters: dict) -> Path:
    """One native folder per id (a value may also be a callable(folder) that writes the folder itself)."""
    for adapter_id, adapter in adapters.items():
        if callable(adapter):
            adapter(folder / adapter_id)
        else:
            save_adapter(adapter, folder / adapter_id)
    return folder


def until(condition, timeout: float = 30) -> bool:
    """Poll `condition()` every 5 ms until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def reference_engine(base, adapters: dict, max_slots: int = 16) -> AdapterEngine:
    engine = AdapterEngine(copy.deepcopy(base), EngineConfig(max_slots=max_slots))
    for adapter_id, adapter in adapters.items():
        engine.load(adapter_id, adapter)
    return engine


def generate_alone(base, adapters: dict, tokenizer, prompt_ids, adapter, params) -> tuple[list[int], str]:
    """(token ids, text) of one request alone on an in-process Generator over `base` and `adapters`: the reference
    every served generation is compared with."""
    from adalora.engine import GenerationRequest, Generator, GeneratorConfig
    generator = Generator(reference_engine(base, adapters), GeneratorConfig(max_batch_size=1))
    handle = generator.submit(GenerationRequest(prompt_ids, adapter, params))
    while generator.has_work():
        generator.step()
    return handle.result.token_ids, tokenizer.decode(handle.result.token_ids, skip_special_tokens=True)


class ServerThread:
    """create_server(config) on port 0 with its event loop on a thread; `attach=False` leaves the base model
    unloaded (health NOT_SERVING) until attach() is called."""

    def __init__(self, config: ServerConfig, attach: bool = True) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.port = self.call(create_server(config))
        self.call(self.server.start())
        self.client = AdaLoraClient(f"127.0.0.1:{self.port}", timeout=30)
        self.backend: Backend | None = None
        if attach:
            self.attach()

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def attach(self) -> Backend:
        self.backend = Backend.open(self.config, self.server.metrics)
        self.call(self.server.attach(self.backend))
        return self.backend

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace: float = 0) -> None:
        self.call(self.server.stop(grace))
        self.client.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def status_of(call) -> tuple[grpc.StatusCode, str]:
    """(code, details) of a call that must fail."""
    try:
        call()
    except grpc.RpcError as e:
        return e.code(), e.details()
    raise AssertionError("the call succeeded, but an error status was expected")


def encoder_server(root: Path, folder: str = "base",
                   **fields) -> tuple[ServerThread, EncoderRunner, PreTrainedTokenizerFast]:
    """A server over the tiny BERT in `root / folder` with the four-label encoder adapters preloaded (max_inputs 4,
    `fields` on top), and the in-process EncoderRunner over the same adapters: the reference of its answers."""
    from tests.conftest import tiny_bert
    from tests.factories import encoder_adapters

    tokenizer = word_tokenizer()
    adapters = encoder_adapters(("d", "a", "c", "b"))
    config = ServerConfig(base_model=str(write_base(tiny_bert(), root / folder, tokenizer)),
                          adapter_dir=str(write_store(root / "adapters", adapters)), preload=tuple(adapters), port=0,
                          max_inputs=4, **fields)
    runner = EncoderRunner(reference_engine(tiny_bert(), adapters), tokenizer, max_length=64)
    return ServerThread(config), runner, tokenizer
