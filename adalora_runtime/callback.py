"""AdaLoRA inside transformers.Trainer: a callback that steps the rank allocator, a mixin that adds the regularizer.

    adapters = inject_adapters(model, AdaLoraConfig(..., total_step=N))
    allocator = RankAllocator(adapters)
    trainer = AdaLoraTrainer(model=model, args=TrainingArguments(max_steps=N, ...), train_dataset=...,
                             adalora_adapters=adapters, callbacks=[AdaLoraCallback(adapters, allocator)])
    trainer.train()
    save_adapter(adapters.export(allocator.masks), "out/")

Hook choice (transformers 5.23, Trainer._inner_training_loop): per optimizer step the order is
backward -> clip -> on_pre_optimizer_step -> optimizer.step() -> on_optimizer_step -> lr_scheduler.step()
-> model.zero_grad() -> global_step += 1 -> on_step_end. `on_optimizer_step` is the one hook after the
optimizer step and before zero_grad (the gradients are still there), which is where RankAllocator.step
must run; state.global_step is still the 0-based index of the step just taken.
"""

from __future__ import annotations

from transformers import Trainer, TrainerCallback

from adalora.allocator import RankAllocator
from adalora.config import ConfigError
from adalora.inject import AdapterSet
from adalora.regularizer import orth_penalty
from adalora.training import param_groups


class AdaLoraCallback(TrainerCallback):
    """Steps the allocator once per optimizer step (after optimizer.step, before zero_grad)."""

    def __init__(self, adapters: AdapterSet, allocator: RankAllocator) -> None:
        self.adapters = adapters
        self.allocator = allocator
        self.steps = 0
        """How many times the allocator was stepped."""

    def on_train_begin(self, args, state, control, **kwargs):
        total = self.adapters.config.total_step
        if state.max_steps != total:
            raise ConfigError(f"Trainer will run {state.max_steps} steps but AdaLoraConfig.total_step={total}: "
                              f"set TrainingArguments(max_steps={total}) or rebuild the config")
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.allocator.step(state.global_step)
        self.steps += 1
        return control


class AdaLoraTrainerMixin:
    """Adds orth_reg_weight * orth_penalty(adapters) to the training loss, in the open, and optimizes
    only the adapters with lam at its own learning rate (training.param_groups), as training.train does.

    Use as `class MyTrainer(AdaLoraTrainerMixin, Trainer)` and pass `adalora_adapters=`.
    """

    def __init__(self, *args, adalora_adapters: AdapterSet, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.adalora_adapters = adalora_adapters

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            groups = param_groups(self.adalora_adapters, self.args.learning_rate, self.args.weight_decay)
            optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
            kwargs.pop("lr", None)
            kwargs.pop("weight_decay", None)
            self.optimizer = optimizer_cls(groups, **kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        config = self.adalora_adapters.config
        if model.training and config.mode == "adalora" and config.orth_reg_weight > 0:
            loss = loss + config.orth_reg_weight * orth_penalty(self.adalora_adapters)
        return (loss, outputs) if return_outputs else loss


class AdaLoraTrainer(AdaLoraTrainerMixin, Trainer):
    """transformers.Trainer with the AdaLoRA regularizer (add AdaLoraCallback for the allocator)."""
