"""Issue 18's proof with the real client: tritonclient[grpc] 2.73 (in .venv-triton, which `make test` creates,
because it needs protobuf < 7 and our stubs protobuf 7) against an `adalora serve` subprocess whose store holds two
LoRA adapters saved by PEFT itself. Liveness, readiness and metadata answer; `infer` on text_input, for both
adapters and two prompts at once, returns PEFT's own greedy text; a decoupled stream's chunks add up to the same
text; the repository index lists the store; load / unload need the admin token."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.factories import varied_llama
from tests.server_setup import word_tokenizer, write_base
from tests.test_http_peft import ADAPTERS, MAX_TOKENS, PROMPTS, peft_greedy, peft_model
from tests.test_server_e2e import ROOT, Served

TRITON_PYTHON = ROOT / ".venv-triton" / "bin" / "python"
TOKEN = "triton-admin"

pytestmark = pytest.mark.skipif(not TRITON_PYTHON.exists(), reason=f"{TRITON_PYTHON} is missing: `make test` creates "
                                                                    f"it (tritonclient[grpc] needs protobuf < 7)")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton")
    base, tokenizer = varied_llama(), word_tokenizer()
    base_dir = write_base(base, root / "base", tokenizer)
    expected = {}
    for adapter_id, (seed, targets) in {**ADAPTERS, "spare": (13, ("q_proj",))}.items():
        model = peft_model(base, seed, targets)
        model.save_pretrained(root / "adapters" / adapter_id)
        expected[adapter_id] = {p: peft_greedy(model, tokenizer, p) for p in PROMPTS}
    server = Served.start("triton", root, base_dir, root / "adapters", tuple(ADAPTERS), ["--http-port", "off"],
                          admin_token=TOKEN)
    info = server.wait_ready()
    plan = {"target": f"127.0.0.1:{info['port']}", "prompts": PROMPTS, "models": list(ADAPTERS),
            "max_tokens": MAX_TOKENS, "stream_model": "peft-b", "admin_token": TOKEN, "load": "spare"}
    reply = subprocess.run([str(TRITON_PYTHON), str(Path(__file__).with_name("triton_client.py"))],
                           input=json.dumps(plan), capture_output=True, text=True, timeout=300)
    server.proc.terminate()
    server.proc.wait(60)
    assert reply.returncode == 0, f"{reply.stderr[-3000:]}\n{server.tail()}"
    return json.loads(reply.stdout), expected


def test_infer_on_text_input_equals_peft_generate_for_two_adapters(world):
    results, expected = world
    assert expected["peft-a"] != expected["peft-b"]
    assert len(results["infer"]) == len(ADAPTERS) * len(PROMPTS)
    for model, prompt, text in results["infer"]:
        assert text == expected[model][prompt], (model, prompt)


def test_a_decoupled_stream_adds_up_to_the_same_text(world):
    results, expected = world
    assert len(results["stream"]) > 2 and "".join(results["stream"]) == expected["peft-b"][PROMPTS[0]]


def test_liveness_readiness_and_metadata(world):
    results, _ = world
    assert results["live"] is True and results["ready"] is True
    assert results["model_ready"] == {m: True for m in ADAPTERS}
    assert results["server_metadata"]["name"] == "adalora" and "model_repository" in \
        results["server_metadata"]["extensions"]
    metadata = results["model_metadata"]
    assert {t["name"] for t in metadata["inputs"]} >= {"text_input", "max_tokens", "temperature", "stream"}
    assert [t["name"] for t in metadata["outputs"]] == ["text_output"]


def test_repository_index_and_admin_load_unload(world):
    results, _ = world
    states = {m["name"]: m.get("state") for m in results["index"]["models"]}
    assert states == {"base": "READY", "peft-a": "READY", "peft-b": "READY", "spare": "UNAVAILABLE"}
    assert results["load_without_token"].startswith("StatusCode.UNAUTHENTICATED")
    assert (results["loaded_ready"], results["unloaded_ready"]) == (True, False)


def test_errors_keep_adalora_v1s_codes(world):
    results, _ = world
    assert results["unknown_model"].startswith("StatusCode.NOT_FOUND") and "'nope'" in results["unknown_model"]
    assert results["unknown_metadata"].startswith("StatusCode.NOT_FOUND")
