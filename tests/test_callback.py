"""transformers.Trainer + AdaLoraCallback + AdaLoraTrainer reproduce training.train (same batches, seed, lr)."""

import copy

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import TrainingArguments

from adalora.allocator import RankAllocator
from adalora.callback import AdaLoraCallback, AdaLoraTrainer
from adalora.config import AdaLoraConfig, ConfigError
from adalora.data import Example, make_batches
from adalora.inject import inject_adapters
from adalora.training import TrainArgs, train
from tests.conftest import tiny_bert
from tests.test_train_cli import cls_rows, make_tokenizer

TOTAL = 12
CONFIG = AdaLoraConfig(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=TOTAL,
                       target_modules=("query", "value", "intermediate.dense"))


class StepOrderedTrainer(AdaLoraTrainer):
    """Feeds batch(step) at step `step`, as training.train does (no shuffling sampler)."""

    def __init__(self, *args, batches, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches = batches

    def get_train_dataloader(self):
        return DataLoader(range(self.args.max_steps), batch_size=1, collate_fn=lambda idx: self.batches(idx[0]))


def _model():
    model = tiny_bert(num_labels=2)
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _trainer(tmp_path, adapters, batches, max_steps=TOTAL):
    allocator = RankAllocator(adapters)
    callback = AdaLoraCallback(adapters, allocator)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, learning_rate=1e-2,
                             lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                             optim="adamw_torch", per_device_train_batch_size=1, report_to="none",
                             save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True, seed=0)
    trainer = StepOrderedTrainer(model=adapters.model, args=args, adalora_adapters=adapters, batches=batches,
                                 train_dataset=list(range(max_steps)), callbacks=[callback])
    return trainer, allocator, callback


def test_trainer_with_callback_matches_training_loop(tmp_path):
    examples = [Example(r["text"], r["label"]) for r in cls_rows(24)]
    batches = make_batches(examples, make_tokenizer("bert"), "seq-cls", batch_size=6, seed=0)
    base = _model()

    torch.manual_seed(0)  # injection draws the initial factors from the global RNG: same seed, same factors
    ours = inject_adapters(copy.deepcopy(base), CONFIG, task_type="seq-cls", labels=["neg", "pos"])
    result = train(ours, batches, TrainArgs(total_steps=TOTAL, lr=1e-2, seed=0))

    torch.manual_seed(0)
    theirs = inject_adapters(copy.deepcopy(base), CONFIG, task_type="seq-cls", labels=["neg", "pos"])
    trainer, allocator, callback = _trainer(tmp_path, theirs, batches)
    trainer.train()

    assert callback.steps == TOTAL
    assert allocator.reached()["triplets"] == allocator.target_budget == int(CONFIG.target_r * len(theirs.layers))
    masks = {p: m.tolist() for p, m in allocator.masks.items()}
    assert masks == {p: m.tolist() for p, m in result.allocator.masks.items()}
    assert 0 < sum(sum(m) for m in masks.values()) < CONFIG.init_r * len(masks)
    for path, layer in theirs.layers.items():
        for name in ("P", "lam", "Q"):
            torch.testing.assert_close(getattr(layer, name), getattr(ours.layers[path], name), atol=1e-4, rtol=1e-3)


def test_callback_rejects_mismatched_step_count(tmp_path):
    adapters = inject_adapters(_model(), CONFIG, task_type="seq-cls", labels=["neg", "pos"])
    batches = make_batches([Example("good", "pos"), Example("bad", "neg")], make_tokenizer("bert"), "seq-cls", 2, 0)
    trainer, _, _ = _trainer(tmp_path, adapters, batches, max_steps=TOTAL + 1)
    with pytest.raises(ConfigError, match="max_steps=12"):
        trainer.train()
