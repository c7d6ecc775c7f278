"""PEFT interop against PEFT itself as the oracle: same logits in PeftModel and in our attached model.

Cases: a PEFT-trained AdaLoRA adapter (with a layer at rank 0) imported and exported back; an adapter
trained here exported to PEFT; plain LoRA (rank/alpha patterns, rsLoRA) imported; exact round trips.
Tiny random models, fp32, atol 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from peft import AdaLoraConfig as PeftAdaLoraConfig
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from adalora import AdaLoraConfig, inject_adapters
from adalora.adapter_file import load_adapter, save_adapter, tensors_sha256, to_tensors
from adalora.inject import attach_adapter
from adalora.peft_interop import detect_format, load_any, load_peft, save_peft, to_peft
from adalora.training import TrainArgs, train

ATOL = 1e-5
LABELS = ["neg", "neu", "pos"]


def llama_base(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(LlamaConfig(**{**config, **overrides})).eval()


def bert_base(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, num_labels=3)).eval()


# name -> (base factory, PEFT task type, our task type, target modules)
MODELS = {
    "llama": (llama_base, "CAUSAL_LM", "causal-lm", ["q_proj", "v_proj", "down_proj"]),
    "bert": (bert_base, "SEQ_CLS", "seq-cls", ["query", "value", "intermediate.dense"]),
}


def batch(task: str, step: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 64, (4, 8), generator=gen)
    labels = torch.randint(0, 3, (4,), generator=gen) if task == "seq-cls" else ids
    return {"input_ids": ids, "labels": labels}


def logits(model, task: str = "causal-lm") -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch(task, 99)["input_ids"]).logits


def base_dir(tmp_path, name: str):
    """The base model saved as a folder (what --base-model points at)."""
    path = tmp_path / f"base-{name}"
    if not path.exists():
        MODELS[name][0]().save_pretrained(path)
    return path


def train_peft_adalora(name: str, out):
    """A PEFT AdaLoRA adapter: a few training steps with update_and_allocate, lora_E amplified so the
    delta is visible in the logits, and the first layer forced to rank 0 (as the allocator can end)."""
    factory, peft_task, task, targets = MODELS[name]
    config = PeftAdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=8, tinit=1, tfinal=2, deltaT=1,
                               target_modules=targets, task_type=peft_task)
    model = get_peft_model(factory(), config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(8):
        model(**batch(task, step)).loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
    model.eval()
    pattern = model.peft_config["default"].rank_pattern
    first = next(iter(pattern))
    pattern[first] = [False] * len(pattern[first])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_E" in n:
                p.mul_(50.0)
    model.base_model.rankallocator.mask_using_rank_pattern(model.base_model.model, pattern)
    model.save_pretrained(out)
    return model


def peft_logits(name: str, path) -> torch.Tensor:
    model = PeftModel.from_pretrained(MODELS[name][0](), str(path)).eval()
    return logits(model, MODELS[name][2])


def attached_logits(name: str, adapter) -> torch.Tensor:
    model = MODELS[name][0]()
    attach_adapter(model, adapter)
    return logits(model.eval(), MODELS[name][2])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_peft_adalora_import_and_export_give_peft_logits(tmp_path, name):
    task = MODELS[name][2]
    original = train_peft_adalora(name, tmp_path / "peft")
    ref = logits(original, task)
    base = logits(MODELS[name][0](), task)
    assert (ref - base).abs().max() > 1e-2, "the adapter must visibly change the logits for this test to mean anything"
    torch.testing.assert_close(peft_logits(name, tmp_path / "peft"), ref, atol=ATOL, rtol=0)

    adapter = load_peft(tmp_path / "peft", base_model_dir=base_dir(tmp_path, name))
    assert adapter.mode == "adalora" and adapter.task_type == task
    assert 0 in adapter.ranks().values() and any(r > 0 for r in adapter.ranks().values())
    torch.testing.assert_close(attached_logits(name, adapter), ref, atol=ATOL, rtol=0)

    save_peft(adapter, tmp_path / "back")
    torch.testing.assert_close(peft_logits(name, tmp_path / "back"), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_native_trained_adapter_exports_to_peft(tmp_path, name):
    factory, _, task, targets = MODELS[name]
    model = factory()
    config = AdaLoraConfig(init_r=4, target_r=1.5, lora_alpha=8, total_step=8, tinit=1, tfinal=2,
                           target_modules=tuple(targets))
    adapters = inject_adapters(model, config, task_type=task, labels=LABELS if task == "seq-cls" else None)
    result = train(adapters, lambda step: batch(task, step), TrainArgs(total_steps=8, lr=5e-2))
    adapter = adapters.export(result.masks())
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.lam.mul_(20.0)  # a visible delta
    ranks = adapter.ranks().values()
    assert min(ranks) < 4, "allocation should have pruned something"
    ours = attached_logits(name, adapter)
    assert (ours - logits(factory(), task)).abs().max() > 1e-2
    save_peft(adapter, tmp_path / "peft")
    torch.testing.assert_close(peft_logits(name, tmp_path / "peft"), ours, atol=ATOL, rtol=0)


LORA_CASES = {
    # name -> (model, LoraConfig kwargs)
    "plain": ("llama", dict(r=4, lora_alpha=8)),
    "patterns": ("llama", dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 2, "down_proj": 6},
                               alpha_pattern={"v_proj": 3, "down_proj": 16})),
    "rslora": ("llama", dict(r=4, lora_alpha=8, use_rslora=True)),
    "head": ("bert", dict(r=3, lora_alpha=6)),
}


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_plain_lora_import_gives_peft_logits(tmp_path, case):
    name, kwargs = LORA_CASES[case]
    factory, peft_task, task, targets = MODELS[name]
    config = LoraConfig(target_modules=targets, task_type=peft_task, init_lora_weights=False, **kwargs)
    torch.manual_seed(1)
    peft_model = get_peft_model(factory(), config).eval()
    peft_model.save_pretrained(tmp_path / "lora")
    ref = logits(peft_model, task)
    labels = LABELS if task == "seq-cls" else None
    adapter = load_peft(tmp_path / "lora", base_model_dir=base_dir(tmp_path, name), labels=labels)
    assert adapter.mode == "lora" and adapter.init_r == kwargs["r"]
    torch.testing.assert_close(attached_logits(name, adapter), ref, atol=ATOL, rtol=0)
    save_peft(adapter, tmp_path / "as-adalora")  # and out again, as PEFT AdaLoRA
    torch.testing.assert_close(peft_logits(name, tmp_path / "as-adalora"), ref, atol=ATOL, rtol=0)


def native_adapter(task: str = "seq-cls"):
    name = "bert" if task == "seq-cls" else "llama"
    factory, _, _, targets = MODELS[name]
    adapters = inject_adapters(factory(), AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=tuple(targets)),
                               task_type=task, labels=LABELS if task == "seq-cls" else None)
    gen = torch.Generator().manual_seed(0)
    masks = {p: torch.rand(4, generator=gen) > 0.4 for p in adapters.layers}
    masks[next(iter(masks))][:] = False
    with torch.no_grad():
        for layer in adapters.layers.values():
            layer.lam.normal_()
    return adapters.export(masks, info={"note": "round trip"})


@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
def test_native_peft_native_round_trip_is_exact(tmp_path, task):
    adapter = native_adapter(task)
    save_adapter(adapter, tmp_path / "native")
    save_peft(load_adapter(tmp_path / "native"), tmp_path / "peft")
    assert detect_format(tmp_path / "native") == "native" and detect_format(tmp_path / "peft") == "peft"
    back = load_any(tmp_path / "peft")  # no base model needed: save_peft embeds the identity
    assert tensors_sha256(to_tensors(back)) == tensors_sha256(to_tensors(adapter))
    for field in ("base", "shapes", "init_r", "lora_alpha", "mode", "task_type", "labels", "info"):
        assert getattr(back, field) == getattr(adapter, field), field
    for path, layer in adapter.layers.items():
        for part in ("P", "lam", "Q"):
            assert torch.equal(getattr(back.layers[path], part), getattr(layer, part))
    assert back.ranks() == adapter.ranks() and 0 in back.ranks().values()


def test_to_peft_layout_matches_peft_conventions():
    adapter = native_adapter("seq-cls")
    state, config = to_peft(adapter)
    path = next(p for p, r in adapter.ranks().items() if r > 0)
    r = adapter.ranks()[path]
    in_f, out_f = adapter.shapes[path]
    assert state[f"base_model.model.{path}.lora_A"].shape == (r, in_f)
    assert state[f"base_model.model.{path}.lora_E"].shape == (r, 1)
    assert state[f"base_model.model.{path}.lora_B"].shape == (out_f, r)
    assert sum(config["rank_pattern"][f"{path}.lora_E"]) == r and len(config["rank_pattern"][f"{path}.lora_E"]) == 4
    zero = next(p for p, r in adapter.ranks().items() if r == 0)
    assert config["rank_pattern"][f"{zero}.lora_E"] == [False] * 4
    assert state[f"base_model.model.{zero}.lora_A"].shape == (0, adapter.shapes[zero][0])
    assert config["modules_to_save"] == ["classifier"] and "base_model.model.classifier.weight" in state
    assert (config["peft_type"], config["task_type"]) == ("ADALORA", "SEQ_CLS")
