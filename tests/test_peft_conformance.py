"""PEFT conformance (issue 14): adapters saved by PEFT itself, with PEFT's defaults and its common options, give
PEFT's own outputs through every entry point, with no --task and no --base-model.

Each row of SUPPORTED is one PEFT configuration, saved by PEFT on a tiny random base whose folder PEFT records in
base_model_name_or_path (as `from_pretrained(folder)` does). The oracle is PeftModel.from_pretrained of that folder:
fp32 logits (atol 1e-5) and greedy tokens. Entry points (the second part of each test id):
  store_grpc  the adapter's folder in a real server's store, requested by id over gRPC (Generate / Classify), and
              GetAdapter's per-module rank and scale against PEFT's modules
  upload      UploadAdapter of the folder, then the same request for the uploaded id
  merge       `adalora merge FOLDER --weights 1 --out OUT` (linear, weight 1), the result attached to the base
  convert     `adalora convert --to native`, back `--to peft` (PEFT loads it), and `--to peft-lora` (PEFT loads it,
              and a reader that applies one global lora_alpha / r to every module gives the same logits)
  inspect     `adalora inspect --json`: ranks, per-module scales and the task
REFUSED lists what our format cannot represent exactly: every entry point refuses it with a message naming the PEFT
option, and nothing stored or serving changes.
"""

from __future__ import annotations

import json
import math
import shutil

import grpc
import pytest
import torch
from peft import AdaLoraConfig, IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (
    BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
    LlamaForSequenceClassification,
)
from transformers.pytorch_utils import Conv1D

from adalora.adapter import is_causal_lm
from adalora.adapter_file import load_adapter
from adalora.cli import main as cli
from adalora.inject import attach_adapter
from adalora.server.config import ServerConfig
from tests.server_setup import ServerThread, status_of, word_tokenizer, write_base

ATOL = 1e-5
NEW_TOKENS = 6
PROMPTS = torch.tensor([[5, 9, 13, 7, 21, 30, 44, 12], [11, 30, 5, 6, 40, 41, 8, 9]])  # (B, T), no pad / eos ids
LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, eos_token_id=2, bos_token_id=1)


def _llama():
    return LlamaForCausalLM(LlamaConfig(**LLAMA))


def _llama_cls():
    return LlamaForSequenceClassification(LlamaConfig(**LLAMA, num_labels=3, pad_token_id=0))


def _bert():
    return BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, num_labels=3))


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=2, eos_token_id=2))


BASES = {"llama": (_llama, "causal-lm"), "llama-cls": (_llama_cls, "seq-cls"), "bert": (_bert, "seq-cls"),
         "gpt2": (_gpt2, "causal-lm")}
"""name -> (factory, the task the server runs it as)."""


def lora(**kw):
    return lambda: LoraConfig(r=4, lora_alpha=8, **kw)


def adalora(**kw):
    return lambda: AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=10, **kw)


# id -> (base, PEFT config factory, saved dtype, ranks pruned to 0 for AdaLoRA (module index: True = all))
SUPPORTED = {
    "lora-task-null": ("llama", lora(target_modules=["q_proj", "v_proj"]), torch.float32),
    "lora-causal-lm-regex": ("llama", lora(target_modules=r".*\.(q|k|o)_proj", task_type="CAUSAL_LM"), torch.float32),
    "lora-all-linear": ("llama", lora(target_modules="all-linear"), torch.float32),
    "lora-layers-to-transform": ("llama", lora(target_modules=["q_proj", "up_proj"], layers_to_transform=[1],
                                               layers_pattern="layers"), torch.float32),
    "lora-rank-alpha-patterns": ("llama", lora(target_modules=["q_proj", "v_proj", "down_proj"],
                                               rank_pattern={"q_proj": 2, "model.layers.1.self_attn.v_proj": 6},
                                               alpha_pattern={"v_proj": 3, "down_proj": 32}), torch.float32),
    "lora-rslora": ("llama", lora(target_modules=["q_proj", "gate_proj"], use_rslora=True,
                                  rank_pattern={"gate_proj": 8}), torch.float32),
    "lora-bias-all-no-biases": ("llama", lora(target_modules=["q_proj"], bias="all"), torch.float32),
    "lora-seq-cls-bert-classifier": ("bert", lora(target_modules=["query", "value"], task_type="SEQ_CLS"),
                                     torch.float32),
    "lora-task-null-bert-classifier": ("bert", lora(target_modules=["query", "intermediate.dense"],
                                                    modules_to_save=["classifier"]), torch.float32),
    "lora-seq-cls-llama-score": ("llama-cls", lora(target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"),
                                 torch.float32),
    "lora-gpt2-conv1d-fan-in-fan-out": ("gpt2", lora(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
                                        torch.float32),
    "lora-saved-fp16": ("llama", lora(target_modules=["q_proj", "v_proj"]), torch.float16),
    "lora-saved-bf16": ("llama", lora(target_modules=["k_proj", "o_proj"]), torch.bfloat16),
    "adalora-task-null-rank0": ("llama", adalora(target_modules=["q_proj", "v_proj", "down_proj"]), torch.float32),
    "adalora-causal-lm-rank0": ("llama", adalora(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
                                torch.float32),
    "adalora-seq-cls-bert-rank0": ("bert", adalora(target_modules=["query", "value"], task_type="SEQ_CLS"),
                                   torch.float32),
    "adalora-saved-bf16": ("llama", adalora(target_modules=["q_proj", "o_proj"]), torch.bfloat16),
}

REFUSED = {  # id -> (base, PEFT config factory, words the refusal must contain)
    "dora": ("llama", lora(target_modules=["q_proj"], use_dora=True), "DoRA"),
    "embedding-lora": ("llama", lora(target_modules=["embed_tokens", "q_proj"]), "embedding"),
    "trainable-tokens": ("llama", lora(target_modules=["q_proj"], trainable_token_indices=[3, 4]),
                         "trainable_token_indices"),
    "ia3": ("llama", lambda: IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
            "peft_type 'IA3'"),
    "lora-bias": ("llama", lora(target_modules=["q_proj"], lora_bias=True), "lora_bias"),
    "bias-lora-only": ("bert", lora(target_modules=["query"], bias="lora_only", task_type="SEQ_CLS"),
                       "bias='lora_only'"),
    "bias-all": ("bert", lora(target_modules=["query"], bias="all", task_type="SEQ_CLS"), "bias='all'"),
}
ENTRY_POINTS = ("store_grpc", "upload", "merge", "convert", "inspect")


# ---------------------------------------------------------------- PEFT side


def base_from(folder):
    """The base as PEFT users load it: from its folder (so PEFT records the folder as base_model_name_or_path)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if is_causal_lm(AutoConfig.from_pretrained(folder)) else AutoModelForSequenceClassification
    return cls.from_pretrained(folder).eval()


def save_with_peft(base_dir, config, dtype, out, seed: int) -> None:
    """get_peft_model + random factors (and head) so the adapter visibly changes the outputs; AdaLoRA rows prune
    the first module to rank 0 and others to fewer ranks, as its allocator ends; then PEFT's save_pretrained."""
    torch.manual_seed(seed)
    model = get_peft_model(base_from(base_dir), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name or "ia3_" in name or "trainable_tokens" in name:
                p.normal_(0, 0.5)
            elif name.endswith(".bias") and p.requires_grad:
                p.add_(0.1)
    if isinstance(config, AdaLoraConfig):
        inner = model.base_model.model
        names = [n.replace(".default", "") for n, _ in inner.named_parameters() if n.endswith("lora_E.default")]
        pattern = {n: [i < (0 if k == 0 else 1 + k % 3) for i in range(config.init_r)] for k, n in enumerate(names)}
        model.peft_config["default"].rank_pattern = pattern
        model.base_model.rankallocator.mask_using_rank_pattern(inner, pattern)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(dtype)
    model.save_pretrained(out)


def peft_model(base_dir, adapter_dir):
    return PeftModel.from_pretrained(base_from(base_dir), str(adapter_dir)).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROMPTS).logits.float()


def greedy(model, prompt: list[int], eos: int = 2) -> list[int]:
    """Argmax continuation of one prompt, eos included when it comes (as the server reports tokens)."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
            if token == eos:
                break
    return out


def outputs(model, task: str) -> dict:
    result = {"logits": logits(model)}
    if task == "causal-lm":
        result["greedy"] = [greedy(model, row.tolist()) for row in PROMPTS]
    return result


def peft_scales(model) -> dict[str, float]:
    """Each adapted module's scale as PEFT runs it: LoRA scaling, AdaLoRA scaling / (ranknum + 1e-5)."""
    scales = {}
    for name, module in model.base_model.model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and "default" in scaling:
            ranknum = getattr(module, "ranknum", None)
            div = float(ranknum["default"]) + 1e-5 if ranknum is not None else 1.0
            scales[name] = scaling["default"] / div
    return scales


def global_reading_logits(base_dir, lora_dir) -> torch.Tensor:
    """A LoRA server's reading that ignores rank_pattern / alpha_pattern: every module at lora_alpha / r."""
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    state = load_file(str(lora_dir / "adapter_model.safetensors"))
    model = base_from(base_dir)
    scale = config["lora_alpha"] / config["r"]
    with torch.no_grad():
        for key, A in state.items():
            path = key.removeprefix("base_model.model.")
            if path.endswith(".lora_A.weight"):
                module = model.get_submodule(path.removesuffix(".lora_A.weight"))
                delta = state[key.replace("lora_A", "lora_B")] @ A * scale  # (out, in)
                module.weight += delta.T if isinstance(module, Conv1D) else delta
            elif not path.endswith(".lora_B.weight"):
                model.get_parameter(path).copy_(state[key])  # a modules_to_save head
    return logits(model)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Base folders, every row saved by PEFT with its PEFT outputs, and one real server per base whose store holds
    that base's rows (supported ones and refused ones)."""
    root = tmp_path_factory.mktemp("conformance")
    tokenizer = word_tokenizer()
    bases = {}
    for name, (factory, _) in BASES.items():
        torch.manual_seed(0)
        bases[name] = write_base(factory().eval(), root / "bases" / name, tokenizer)
    rows = {}
    for seed, (row, (base, config, dtype)) in enumerate(SUPPORTED.items()):
        folder = root / "stores" / base / row
        save_with_peft(bases[base], config(), dtype, folder, seed)
        reference = peft_model(bases[base], folder)
        task = BASES[base][1]
        expected = outputs(reference, task)
        assert (expected["logits"] - logits(base_from(bases[base]))).abs().max() > 1e-2, f"{row}: adapter changes nothing"
        rows[row] = {"folder": folder, "base": base, "task": task, "expected": expected,
                     "scales": peft_scales(reference), "ranks": peft_ranks(folder)}
    for seed, (row, (base, config, _)) in enumerate(REFUSED.items()):
        save_with_peft(bases[base], config(), torch.float32, root / "stores" / base / f"bad-{row}", 100 + seed)
    servers = {}
    for name in BASES:
        (root / "stores" / name).mkdir(parents=True, exist_ok=True)
        servers[name] = ServerThread(ServerConfig(base_model=str(bases[name]), adapter_dir=str(root / "stores" / name),
                                                  port=0, max_batch_size=4, max_slots=8, max_new_tokens=16,
                                                  default_max_new_tokens=NEW_TOKENS))
    yield {"root": root, "bases": bases, "rows": rows, "servers": servers}
    for server in servers.values():
        server.stop()


def peft_ranks(folder) -> dict[str, int]:
    """Each module's rank from the tensors PEFT saved (lora_A rows)."""
    state = load_file(str(folder / "adapter_model.safetensors"))
    return {k.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]: t.shape[0]
            for k, t in state.items() if ".lora_A" in k}


# ---------------------------------------------------------------- checks per entry point


def served_outputs(server: ServerThread, adapter_id: str, task: str) -> dict:
    if task == "causal-lm":
        replies = [server.client.generate(row.tolist(), adapter_id, max_new_tokens=NEW_TOKENS, temperature=0)
                   for row in PROMPTS]
        return {"greedy": [list(r.token_ids) for r in replies]}
    reply = server.client.classify([row.tolist() for row in PROMPTS], adapter_id)
    return {"logits": torch.tensor([list(r.logits) for r in reply.results])}


def assert_matches(got: dict, expected: dict, what: str) -> None:
    if "logits" in got:
        torch.testing.assert_close(got["logits"], expected["logits"], atol=ATOL, rtol=0, msg=what)
    if "greedy" in got:
        assert got["greedy"] == expected["greedy"], what


def attached_outputs(world, row: dict, adapter) -> dict:
    model = base_from(world["bases"][row["base"]])
    attach_adapter(model, adapter)
    return outputs(model.eval(), row["task"])


def check_grpc_info(server: ServerThread, adapter_id: str, row: dict) -> None:
    info = server.client.get_adapter(adapter_id)
    assert info.task_type == row["task"]
    got = {r.module: (r.rank, r.scale) for r in info.ranks}
    assert {m: rank for m, (rank, _) in got.items()} == row["ranks"]
    for module, scale in row["scales"].items():
        if row["ranks"].get(module):
            assert math.isclose(got[module][1], scale, rel_tol=1e-5), (module, got[module][1], scale)


def run_store_grpc(world, row_id: str, row: dict, tmp_path) -> None:
    server = world["servers"][row["base"]]
    assert_matches(served_outputs(server, row_id, row["task"]), row["expected"], f"{row_id} served from the store")
    check_grpc_info(server, row_id, row)


def run_upload(world, row_id: str, row: dict, tmp_path) -> None:
    server, uploaded = world["servers"][row["base"]], f"{row_id}.up"
    server.client.upload(uploaded, row["folder"], overwrite=True)
    assert_matches(served_outputs(server, uploaded, row["task"]), row["expected"], f"{row_id} uploaded")
    check_grpc_info(server, uploaded, row)


def run_merge(world, row_id: str, row: dict, tmp_path) -> None:
    head = ["--head-from", "1"] if row["task"] == "seq-cls" else []
    assert cli(["merge", str(row["folder"]), "--weights", "1", "--out", str(tmp_path / "merged"), *head]) == 0
    assert_matches(attached_outputs(world, row, load_adapter(tmp_path / "merged")), row["expected"], f"{row_id} merged")


def run_convert(world, row_id: str, row: dict, tmp_path) -> None:
    native, back, plain = tmp_path / "native", tmp_path / "back", tmp_path / "plain"
    assert cli(["convert", str(row["folder"]), str(native), "--to", "native"]) == 0
    adapter = load_adapter(native)
    assert adapter.task_type == row["task"]
    assert_matches(attached_outputs(world, row, adapter), row["expected"], f"{row_id} as native")
    assert cli(["convert", str(native), str(back), "--to", "peft"]) == 0
    base_dir = world["bases"][row["base"]]
    assert_matches(outputs(peft_model(base_dir, back), row["task"]), row["expected"], f"{row_id} back to PEFT")
    assert cli(["convert", str(native), str(plain), "--to", "peft-lora"]) == 0
    assert_matches(outputs(peft_model(base_dir, plain), row["task"]), row["expected"], f"{row_id} as a plain LoRA")
    torch.testing.assert_close(global_reading_logits(base_dir, plain), row["expected"]["logits"], atol=ATOL, rtol=0)


RUNNERS = {"store_grpc": run_store_grpc, "upload": run_upload, "merge": run_merge, "convert": run_convert}


@pytest.mark.parametrize("entry", [e for e in ENTRY_POINTS if e != "inspect"])
@pytest.mark.parametrize("row_id", sorted(SUPPORTED))
def test_peft_adapter_gives_peft_outputs(world, row_id, entry, tmp_path):
    RUNNERS[entry](world, row_id, world["rows"][row_id], tmp_path)


@pytest.mark.parametrize("row_id", sorted(SUPPORTED))
def test_peft_adapter_inspect(world, row_id, capsys):
    row = world["rows"][row_id]
    capsys.readouterr()
    assert cli(["inspect", str(row["folder"]), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["format"] == "peft" and described["task_type"] == row["task"]
    assert described["ranks"] == row["ranks"]
    assert described["task_source"] in ("adapter config", f"base model {world['bases'][row['base']]}")
    for module, scale in row["scales"].items():
        if row["ranks"].get(module):
            assert math.isclose(described["scales"][module], scale, rel_tol=1e-5), (module, scale)


# ---------------------------------------------------------------- refusals


def snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("row_id", sorted(REFUSED))
def test_unrepresentable_peft_adapter_is_refused(world, row_id, entry, tmp_path, capsys):
    base, _, words = REFUSED[row_id]
    folder = world["root"] / "stores" / base / f"bad-{row_id}"
    server = world["servers"][base]
    store = world["root"] / "stores" / base
    before = snapshot(folder)
    if entry in ("store_grpc", "upload"):
        loaded = sorted(a.id for a in server.client.list_adapters().adapters)
        ids_before = sorted(p.name for p in store.iterdir())
        if entry == "store_grpc":
            code, message = status_of(lambda: server.client.load_adapter(f"bad-{row_id}"))
            assert code == grpc.StatusCode.FAILED_PRECONDITION
        else:
            code, message = status_of(lambda: server.client.upload(f"up-bad-{row_id}", folder))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert sorted(p.name for p in store.iterdir()) == ids_before  # nothing stored, nothing left behind
        after = sorted(a.id for a in server.client.list_adapters().adapters)
        assert after == loaded and server.client.health() == "SERVING"  # nothing serving changed
    else:
        capsys.readouterr()
        argv = {"merge": ["merge", str(folder), "--weights", "1", "--out", str(tmp_path / "out")],
                "convert": ["convert", str(folder), str(tmp_path / "out"), "--to", "native"],
                "inspect": ["inspect", str(folder)]}[entry]
        assert cli(argv) == 2
        message = capsys.readouterr().err
        assert not (tmp_path / "out").exists()
        assert "Traceback" not in message
    assert words in message, message
    assert snapshot(folder) == before


# ---------------------------------------------------------------- where the base and the task come from


def other_base(world) -> str:
    """A Llama whose hidden size differs from the rows' base: every adapted module has other shapes."""
    folder = world["root"] / "bases" / "llama-wide"
    if not folder.exists():
        torch.manual_seed(0)
        write_base(LlamaForCausalLM(LlamaConfig(**{**LLAMA, "hidden_size": 48})).eval(), folder)
    return str(folder)


def with_base_name(world, tmp_path, name: str):
    """The task-null LoRA row with base_model_name_or_path set to `name`."""
    folder = tmp_path / "adapter"
    shutil.copytree(world["rows"]["lora-task-null"]["folder"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": name}))
    return folder


RESOLUTION = {  # id -> (argv after the adapter folder, base_model_name_or_path or None to keep, exit, words)
    "explicit-base-wrong-shapes": (lambda w, out: ["--to", "native", "--base-model", other_base(w)], None, 2,
                                   ["module model.layers.0.self_attn.q_proj", "(32, 32)", "(48, 48)"]),
    "local-base-does-not-fit": (lambda w, out: ["--to", "native"], "wide", 2,
                                ["does not fit", "(32, 32)", "(48, 48)", "--base-model"]),
    "hub-name-is-never-fetched": (lambda w, out: ["--to", "native"], "some-org/some-model", 2,
                                  ["'some-org/some-model'", "--base-model"]),
    "explicit-base-over-a-hub-name": (lambda w, out: ["--to", "native", "--base-model", str(w["bases"]["llama"])],
                                      "some-org/some-model", 0, []),
    "task-flag-overrides": (lambda w, out: ["--to", "native", "--task", "feature-extraction", "--base-model",
                                            str(w["bases"]["llama"])], None, 2, ["is not a Linear / Conv1D module"]),
}


@pytest.mark.parametrize("case", sorted(RESOLUTION))
def test_base_and_task_resolution(world, case, tmp_path, capsys):
    argv, name, code, words = RESOLUTION[case]
    if name == "wide":
        name = other_base(world)
    folder = with_base_name(world, tmp_path, name) if name is not None else world["rows"]["lora-task-null"]["folder"]
    capsys.readouterr()
    assert cli(["convert", str(folder), str(tmp_path / "out"), *argv(world, tmp_path / "out")]) == code
    err = capsys.readouterr().err
    for word in words:
        assert word in err, err
    assert (tmp_path / "out").exists() == (code == 0)
    if code == 0:
        assert load_adapter(tmp_path / "out").task_type == "causal-lm"


def test_merge_takes_task_and_base_flags(world, tmp_path, capsys):
    """merge resolves like convert: --task and --base-model reach PEFT inputs (a wrong base names the module)."""
    folder = with_base_name(world, tmp_path, "some-org/some-model")
    capsys.readouterr()
    assert cli(["merge", str(folder), "--weights", "1", "--out", str(tmp_path / "m1")]) == 2
    assert "--base-model" in capsys.readouterr().err
    assert cli(["merge", str(folder), str(folder), "--weights", "0.5", "0.5", "--out", str(tmp_path / "m2"),
                "--base-model", str(world["bases"]["llama"]), "--task", "causal-lm"]) == 0
    row = world["rows"]["lora-task-null"]
    assert_matches(attached_outputs(world, row, load_adapter(tmp_path / "m2")), row["expected"], "0.5 + 0.5 of one")
    assert cli(["merge", str(folder), "--weights", "1", "--out", str(tmp_path / "m3"),
                "--base-model", other_base(world)]) == 2
    assert "(48, 48)" in capsys.readouterr().err
