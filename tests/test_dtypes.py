"""`--dtype auto` (adalora.dtypes.resolve) picks bfloat16 only where the hardware computes it, from the CPU's own
flags; and an adapter served in a bfloat16 base gives PEFT's bfloat16 logits within the stated tolerance (float32:
greedy identical, tests/test_peft_conformance.py and tests/test_http_peft.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from adalora import dtypes
from adalora.config import ConfigError
from adalora.engine import AdapterEngine, EngineConfig
from adalora.peft_interop import load_any
from adalora.server.config import ServerConfig
from tests.factories import varied_llama

X86_BF16 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n"
X86_AMX = "flags\t\t: fpu avx2 amx_tile amx_bf16\n"
X86_PLAIN = "flags\t\t: fpu sse avx2 fma\nbugs\t\t: spectre_v1\n"
ARM_BF16 = "Features\t: fp asimd sve bf16 i8mm\n"
ARM_PLAIN = "Features\t: fp asimd\n"


@pytest.mark.parametrize("cpuinfo, native", [(X86_BF16, True), (X86_AMX, True), (X86_PLAIN, False), (ARM_BF16, True),
                                             (ARM_PLAIN, False), ("", False), ("model name\t: avx512_bf16\n", False)])
def test_native_bf16_is_read_from_the_cpus_flags(cpuinfo, native):
    assert dtypes.cpu_computes_bf16(cpuinfo) is native


# (name, device, CPU has bf16, CUDA has bf16) -> resolved
RESOLVE = [
    ("auto", "cpu", True, False, "bfloat16"),
    ("auto", "cpu", False, False, "float32"),
    ("auto", "cuda", False, True, "bfloat16"),
    ("auto", "cuda:1", True, False, "float32"),  # a CUDA device without bf16: float32, whatever the CPU
    ("float16", "cpu", True, True, "float16"),
    ("float32", "cuda", True, True, "float32"),
]


@pytest.mark.parametrize("name, device, cpu_bf16, cuda_bf16, expected", RESOLVE)
def test_resolve(monkeypatch, name, device, cpu_bf16, cuda_bf16, expected):
    monkeypatch.setattr(dtypes, "cpu_computes_bf16", lambda: cpu_bf16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_bf16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: cuda_bf16)
    assert dtypes.resolve(name, device) == expected


def test_the_server_takes_auto_and_refuses_other_names():
    assert ServerConfig(base_model="m", adapter_dir="a", dtype="auto").dtype == "auto"
    with pytest.raises(ConfigError, match="dtype 'fp8' is not one of"):
        ServerConfig(base_model="m", adapter_dir="a", dtype="fp8")


BF16_TOLERANCE = 0.05
"""Largest |logit difference| / largest |logit|, ours vs PEFT's, both with the base in bfloat16. Measured here:
0.009 and 0.014 for the two seeds below, against 0.62 and 0.98 without the adapter (bf16 keeps 8 bits of mantissa; the two sides round the adapter's product at different points:
PEFT adds x @ A.T @ B.T scaled in the base's dtype, we fold lambda and the scale into A in float32 first)."""


@pytest.mark.parametrize("seed", [11, 12])
def test_bf16_logits_are_peft_bf16_logits_within_the_stated_tolerance(tmp_path, seed):
    base = varied_llama()
    torch.manual_seed(seed)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                          target_modules=["q_proj", "v_proj", "down_proj"],
                                                          task_type="CAUSAL_LM"))
    base.save_pretrained(tmp_path / "base")
    peft.save_pretrained(tmp_path / "adapter")
    adapter = load_any(tmp_path / "adapter", base_model_dir=tmp_path / "base")
    ids = torch.tensor([[5, 9, 13, 7, 20, 21]])
    peft_bf16 = copy.deepcopy(peft).to(torch.bfloat16).eval()
    engine = AdapterEngine(copy.deepcopy(base).to(torch.bfloat16).eval(), EngineConfig(max_slots=2))
    engine.load("p", adapter)
    with torch.no_grad():
        expected = peft_bf16(input_ids=ids).logits.float()
        with engine.batch(engine.context(["p"], ids.shape[1])):
            ours = engine.model(input_ids=ids).logits.float()
        plain = copy.deepcopy(base).to(torch.bfloat16).eval()(input_ids=ids).logits.float()
    scale = expected.abs().max()
    assert (ours - expected).abs().max() / scale <= BF16_TOLERANCE
    assert (plain - expected).abs().max() / scale > 2 * BF16_TOLERANCE  # the adapter matters: the check can fail


@pytest.mark.parametrize("cpu_bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_a_server_with_dtype_auto_loads_what_resolve_picks(tmp_path, monkeypatch, cpu_bf16, expected):
    from tests.factories import random_adapter
    from tests.server_setup import ServerThread, word_tokenizer, write_base, write_store
    monkeypatch.setattr(dtypes, "cpu_computes_bf16", lambda: cpu_bf16)
    base = varied_llama()
    config = ServerConfig(base_model=str(write_base(base, tmp_path / "base", word_tokenizer())),
                          adapter_dir=str(write_store(tmp_path / "adapters", {"a": random_adapter(base, 1)})),
                          preload=("a",), port=0, dtype="auto")
    server = ServerThread(config)
    try:
        assert next(server.backend.engine.model.parameters()).dtype == expected
        reply = server.client.generate([5, 6, 7], "a", max_new_tokens=3, temperature=0)
        assert len(reply.token_ids) == 3
    finally:
        server.stop()
