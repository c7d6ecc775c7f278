"""Issue 19's must-show on the real model (slow tier): `adalora serve-ray --replicas 2` over the prepared SmolLM2-135M
and three PEFT LoRA adapters saved by PEFT itself; the real `openai` client's greedy completions equal PEFT's own
`generate` for each adapter, each adapter is answered by one replica, and both replicas serve."""

from __future__ import annotations

import copy
import signal
import subprocess

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("ray.serve", reason="serve-ray needs the ray extra: pip install -e '.[ray]'")

from adalora import assets  # noqa: E402
from tests.test_ray_serve import RayServed, free_port  # noqa: E402

pytestmark = pytest.mark.slow
PROMPTS = ["The capital of France is", "Once upon a time, a little"]
NEW_TOKENS = 8
LORA_B_STD = 0.2
"""Std of lora_B: large enough that every adapter moves the greedy text off the base model's (asserted)."""


def peft_lora(model, seed: int):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, target_modules=["q_proj", "v_proj"])).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * LORA_B_STD)
    return peft_model


def greedy(model, tokenizer, prompt: str) -> str:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        folder = assets.model_path("smollm2-135m")
    except assets.NotPreparedError as e:
        pytest.fail(f"run `adalora prepare` first ({e})", pytrace=False)
    root = tmp_path_factory.mktemp("ray-real")
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    expected = {"base": [greedy(base, tokenizer, p) for p in PROMPTS]}
    for i, adapter_id in enumerate(("smol-a", "smol-b", "smol-c")):
        model = peft_lora(base, 100 + i)
        model.save_pretrained(root / "adapters" / adapter_id)
        expected[adapter_id] = [greedy(model, tokenizer, p) for p in PROMPTS]
        del model
    del base
    server = RayServed(root, folder, root / "adapters", free_port())
    server.wait_ready(timeout=600)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0,
                           timeout=600)
    yield client, expected
    server.proc.send_signal(signal.SIGTERM)
    try:
        assert server.proc.wait(180) == 0, server.tail()
    except subprocess.TimeoutExpired:
        server.proc.kill()
        raise


def test_two_replicas_answer_three_peft_adapters_as_peft_generate(served):
    client, expected = served
    for adapter_id in ("smol-a", "smol-b", "smol-c"):
        assert expected[adapter_id] != expected["base"], adapter_id  # the adapter changes the text
    replicas: dict[str, set[str]] = {}
    for model, texts in expected.items():
        raw = client.completions.with_raw_response.create(model=model if model != "base" else "smollm2-135m",
                                                          prompt=PROMPTS, max_tokens=NEW_TOKENS, temperature=0)
        assert [c.text for c in raw.parse().choices] == texts, model
        replicas.setdefault(model, set()).add(raw.headers["x-adalora-replica"])
    for adapter_id in ("smol-a", "smol-b", "smol-c"):  # again: each adapter stays where it was loaded
        raw = client.completions.with_raw_response.create(model=adapter_id, prompt=PROMPTS[0], max_tokens=2,
                                                          temperature=0)
        replicas[adapter_id].add(raw.headers["x-adalora-replica"])
        assert raw.headers["x-adalora-adapter-loads"] == "1"
    assert all(len(replicas[a]) == 1 for a in ("smol-a", "smol-b", "smol-c")), replicas
    assert len(set().union(*replicas.values())) == 2, replicas
