"""Every config error path names the value to change."""

import pytest

from adalora import AdaLoraConfig, ConfigError, inject_adapters
from adalora.config import schedule_from_fractions
from tests.conftest import tiny_bert, tiny_llama

BAD = [
    (dict(mode="dora"), "mode="),
    (dict(init="xavier"), "init="),
    (dict(init_r=0, target_r=0), "init_r=0"),
    (dict(target_r=2, budget=100), "exactly one"),
    (dict(), "exactly one"),
    (dict(target_r=20), "target_r=20"),
    (dict(target_r=2, tinit=8, tfinal=4, total_step=10), "decrease tinit/tfinal or increase total_step"),
    (dict(target_r=2, deltaT=50, total_step=10), "deltaT=50"),
    (dict(target_r=2, beta1=1.0), "beta1"),
    (dict(target_r=2, orth_reg_weight=-1), "orth_reg_weight"),
    (dict(target_r=2, dropout=1.0), "dropout"),
    (dict(mode="lora", target_r=2), "lora mode prunes nothing"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_config_is_rejected_with_a_clear_message(kwargs, message):
    kwargs.setdefault("total_step", 10)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        AdaLoraConfig(**kwargs)


def test_unknown_target_module_lists_available_ones():
    with pytest.raises(ConfigError, match=r"unknown target module\(s\) \['qkv'\].*q_proj"):
        inject_adapters(tiny_llama(), AdaLoraConfig(target_r=2, total_step=10, target_modules=("qkv",)))


def test_double_injection_and_missing_head_are_rejected():
    model = tiny_llama()
    inject_adapters(model, AdaLoraConfig(target_r=2, total_step=10))
    with pytest.raises(ConfigError, match="already adapted"):
        inject_adapters(model, AdaLoraConfig(target_r=2, total_step=10, target_modules=("q_proj",)))
    with pytest.raises(ConfigError, match="classification head"):
        inject_adapters(tiny_llama(), AdaLoraConfig(target_r=2, total_step=10), task_type="seq-cls")


def test_default_targets_cover_every_block_linear():
    adapters = inject_adapters(tiny_bert(), AdaLoraConfig(target_r=2, total_step=10), task_type="seq-cls", labels=["a"])
    kinds = {p.split("layer.")[1].split(".", 1)[1] for p in adapters.layers}
    assert kinds == {"attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense", "intermediate.dense", "output.dense"}
    assert "bert.pooler.dense" not in adapters.layers and "classifier" in adapters.head


@pytest.mark.parametrize("total", [1, 10, 137, 5000])
def test_fraction_schedule_is_always_valid(total):
    AdaLoraConfig(target_r=2, total_step=max(total, 3), **schedule_from_fractions(max(total, 3)))
