"""Issue 17's proof, as a user runs it: `adalora serve` in a subprocess, two LoRA adapters saved by PEFT itself in the
store, and the real `openai` package pointed at its HTTP port. Greedy completions (unary and streamed) equal PEFT's own
`generate` on the same base; /v1/models lists both adapters under the base; an unknown model is NotFoundError; the
server keeps answering through --drain-delay with its health already 503, then drains and exits 0 on SIGTERM."""

from __future__ import annotations

import copy
import signal
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
from peft import LoraConfig, get_peft_model

from tests.factories import varied_llama
from tests.server_setup import word_tokenizer, write_base
from tests.test_server_e2e import Served

PROMPTS = ["w5 w9 w13 w7", "w20 w21 w30"]
MAX_TOKENS = 8
DRAIN_DELAY = 3
ADAPTERS = {"peft-a": (11, ("q_proj", "v_proj")), "peft-b": (12, ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                   "gate_proj", "up_proj", "down_proj"))}


def peft_model(base, seed: int, targets: tuple[str, ...]):
    """A PEFT LoRA with random (non-zero) A and B, so the adapter changes the greedy tokens."""
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False,
                        task_type="CAUSAL_LM")
    return get_peft_model(copy.deepcopy(base), config).eval()


def peft_greedy(model, tokenizer, prompt: str) -> str:
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                             do_sample=False, pad_token_id=0)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("http-peft")
    base, tokenizer = varied_llama(), word_tokenizer()
    base_dir = write_base(base, root / "base", tokenizer)
    expected = {}
    for adapter_id, (seed, targets) in ADAPTERS.items():
        model = peft_model(base, seed, targets)
        model.save_pretrained(root / "adapters" / adapter_id)
        expected[adapter_id] = [peft_greedy(model, tokenizer, p) for p in PROMPTS]
    server = Served.start("http", root, base_dir, root / "adapters", tuple(ADAPTERS),
                          ["--drain-delay", str(DRAIN_DELAY)])
    info = server.wait_ready()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{info['http_port']}/v1", api_key="unused", max_retries=0,
                           timeout=60)
    yield server, client, expected
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait(30)


def test_openai_completions_equal_peft_generate_for_two_peft_adapters(world):
    _, client, expected = world
    assert expected["peft-a"] != expected["peft-b"]  # the two adapters really differ
    for adapter_id, texts in expected.items():
        reply = client.completions.create(model=adapter_id, prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0)
        assert [c.text for c in reply.choices] == texts, adapter_id
        streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
            model=adapter_id, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, stream=True))
        assert streamed == texts[0], adapter_id


def test_models_list_the_adapters_and_an_unknown_model_is_not_found(world):
    _, client, _ = world
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"base", "peft-a", "peft-b"}
    assert models["peft-a"].parent == "base" and models["peft-a"].loaded is True
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="peft-c", prompt=PROMPTS[0], max_tokens=2)


def http_health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as e:
        return e.code


def test_sigterm_ends_the_http_server_with_the_process(world):
    """With --drain-delay, /health turns 503 at SIGTERM while a request that still arrives is answered; then the
    drain, and the process exits 0."""
    server, client, expected = world
    port = server.info["http_port"]
    server.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    while http_health(port) != 503:
        assert time.monotonic() - signalled < DRAIN_DELAY, "health still SERVING after SIGTERM"
        time.sleep(0.05)
    reply = client.completions.create(model="peft-a", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    assert time.monotonic() - signalled < DRAIN_DELAY and reply.choices[0].text == expected["peft-a"][0]
    assert server.proc.wait(60) == 0, server.tail()
    assert time.monotonic() - signalled >= DRAIN_DELAY
    with pytest.raises(openai.APIConnectionError):
        client.models.list()
