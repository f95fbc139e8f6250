"""Nothing grows per step, and the live teacher runs the student's modules without a model-wide mode switch (issue 21,
points 2 and 3): counted through `train` and `compute_loss`."""

from __future__ import annotations

import pytest
import torch
import transformers.modeling_utils
from conftest import make_model
from peft import LoraConfig
from test_trainer import LORA, hand_batch, make_trainer
from transformers import PreTrainedModel, TrainerCallback


def backbone(trainer) -> torch.nn.Module:
    """The transformers CausalLM inside the trainer's (PEFT-wrapped) model."""
    model = trainer.model
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class EmbeddingHooks(TrainerCallback):
    """The number of forward hooks on the input embeddings after each optimiser step."""

    def __init__(self, model: PreTrainedModel):
        self.embeddings, self.counts = model.get_input_embeddings(), []

    def on_step_end(self, args, state, control, **kwargs):
        self.counts.append(len(self.embeddings._forward_hooks))


@pytest.mark.parametrize("peft_config", [None, LORA], ids=["full", "lora"])
def test_input_embedding_hooks_stay_constant_over_ten_steps(tmp_path, tokenizer, tiny_model_dir, peft_config):
    """Gradient checkpointing is toggled around every generation, log-prob and teacher pass; each toggle used to add
    one `requires_grad` hook on the input embeddings (full: 4, 7, ..., 31 after 10 steps; LoRA: 5, 8, ..., 32)."""
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, peft_config=peft_config, gradient_checkpointing=True,
                           max_steps=10)  # fmt: skip
    hooks = EmbeddingHooks(backbone(trainer))
    trainer.add_callback(hooks)
    trainer.train()
    assert backbone(trainer).is_gradient_checkpointing
    assert hooks.counts == [1] * 10  # the one hook gradient checkpointing needs, every step


@pytest.mark.parametrize("peft_config", [None, LORA], ids=["full", "lora"])
def test_teacher_pass_switches_no_model_mode(tmp_path, tokenizer, tiny_model_dir, monkeypatch, peft_config):
    """`PreTrainedModel.train`/`eval` re-kernelize a model with Hub kernels when the mode changes: the teacher pass
    calls neither (before: 2 switches and 2 `kernelize` runs per `compute_loss`), and leaves every flag as it was."""
    switches, kernelized = [], []
    train = PreTrainedModel.train
    monkeypatch.setattr(PreTrainedModel, "train", lambda self, mode=True: switches.append(mode) or train(self, mode))
    kernelize = transformers.modeling_utils.kernelize
    monkeypatch.setattr(
        transformers.modeling_utils, "kernelize", lambda *a, **k: kernelized.append(1) or kernelize(*a, **k)
    )
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, peft_config=peft_config, gradient_checkpointing=True)
    trainer.model.train()
    backbone(trainer).gradient_checkpointing_enable()
    flags = [(m.training, getattr(m, "gradient_checkpointing", None)) for m in trainer.model.modules()]
    trainer.current_gradient_accumulation_steps = 1
    switches.clear(), kernelized.clear()
    for seed in range(5):
        loss = trainer.compute_loss(trainer.model, hand_batch(tokenizer, seed))
        loss.backward()
    assert trainer._metrics["train"]["sdpg/distill_kl"][-1] > 0  # the teacher ran
    assert switches == [] and kernelized == []
    assert [(m.training, getattr(m, "gradient_checkpointing", None)) for m in trainer.model.modules()] == flags


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory, tokenizer) -> str:
    path = tmp_path_factory.mktemp("tiny-llama-dropout")
    make_model(tokenizer, attention_dropout=0.5).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


LORA_DROPOUT = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"])


@pytest.mark.parametrize("peft_config", [None, LORA_DROPOUT], ids=["full", "lora"])
def test_teacher_equals_an_eval_mode_forward_with_dropout_configured(tmp_path, tokenizer, dropout_model_dir,
                                                                       peft_config):  # fmt: skip
    """Attention dropout 0.5 (read from each attention module's own `training`) and, with LoRA, adapter dropout 0.5:
    the teacher's hidden states equal those of the same model in eval mode, and the student's, in the same
    `compute_loss`, still see dropout."""
    trainer = make_trainer(tmp_path, dropout_model_dir, tokenizer, peft_config=peft_config)
    if peft_config is not None:
        with torch.no_grad():  # LoRA B starts at zero, which would make adapter dropout a no-op
            for name, p in trainer.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    batch = hand_batch(tokenizer)
    captured = []
    hook = backbone(trainer).model.register_forward_hook(lambda m, a, out: captured.append(out.last_hidden_state))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    try:
        trainer.compute_loss(trainer.model, batch)
    finally:
        hook.remove()
    teacher, student = captured[0].detach(), captured[1].detach()
    rows = torch.tensor([0, 2])  # the positive-advantage rows, the ones distilled
    assert teacher.size(0) == len(rows)

    def eval_forward(prompt_ids, prompt_mask, positions: bool) -> torch.Tensor:
        ids = torch.cat([prompt_ids, batch["completion_ids"]], dim=1)
        mask = torch.cat([prompt_mask, batch["completion_mask"]], dim=1)
        position_ids = (mask.cumsum(1) - 1).clamp(min=0) if positions else None
        trainer.model.eval()
        try:
            with torch.no_grad():
                return backbone(trainer).model(input_ids=ids, attention_mask=mask, position_ids=position_ids)[0]
        finally:
            trainer.model.train()

    expected = eval_forward(batch["teacher_prompt_ids"], batch["teacher_prompt_mask"], positions=True)[rows]
    torch.testing.assert_close(teacher, expected, rtol=1e-5, atol=1e-6)
    unmasked = eval_forward(batch["prompt_ids"], batch["prompt_mask"], positions=False)
    assert not torch.allclose(student, unmasked, atol=1e-3)  # the student forward kept its dropout
