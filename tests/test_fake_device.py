"""A CPU test that catches device bugs (issue 21, point 7): one `compute_loss` and backward with every parameter,
buffer and input on a fake accelerator device (`tests/fake_device.py`), over the teacher kinds, LoRA, gradient
checkpointing, the distillation and outcome filters, off-policy importance sampling and the entropy bonus. A tensor
made without `device=` anywhere on that path raises the device-mismatch error the first GPU run would."""

from __future__ import annotations

import pytest
import torch
import transformers.modeling_utils
from fake_device import FAKE_DEVICE, OnDevice, fake_device_run, to_fake_device
from test_trainer import LORA, hand_batch, make_trainer, off_policy

# Each case: (trainer overrides, with LoRA, the batch is off-policy). Off-policy batches carry old log-probs around
# the model's, vLLM's importance-sampling ratio and the sampler's log-probs, as GRPOTrainer hands them over.
CASES = {
    "live": ({}, False, False),
    "base": ({"teacher_model_kind": "base"}, False, False),
    "ema": ({"teacher_model_kind": "ema"}, False, False),
    "lora-live": ({}, True, False),
    "lora-base": ({"teacher_model_kind": "base"}, True, False),
    "lora-ema": ({"teacher_model_kind": "ema"}, True, False),
    "gradient-checkpointing": ({"gradient_checkpointing": True}, False, False),
    "lora-gradient-checkpointing": ({"gradient_checkpointing": True}, True, False),
    "filters": ({"distill_exclude_eos": True, "distill_teacher_confident_only": True, "top_entropy_quantile": 0.5,
                 "off_policy_mask_threshold": 0.1}, False, True),
    "off-policy-importance-sampling": ({}, False, True),
    "off-policy-sequence-level": ({"importance_sampling_level": "sequence"}, False, True),
    "off-policy-vespo": ({"loss_type": "vespo", "dual_clip": None}, False, True),
    "off-policy-cispo": ({"loss_type": "cispo", "dual_clip": None}, False, True),
    "entropy-bonus": ({"entropy_coef": 0.1}, False, False),
    "rlsd": ({"method": "rlsd"}, False, False),
    "opcd": ({"method": "opcd"}, False, False),
    "ufkl-term-grad-norms": ({"kl_estimator": "ufkl", "log_term_grad_norms": True}, False, False),
}  # fmt: skip


def case_batch(trainer, tokenizer, off_policy_batch: bool) -> dict:
    batch = hand_batch(tokenizer)
    batch["completion_ids"][0, 3] = tokenizer.eos_token_id  # an EOS inside a distilled row, for distill_exclude_eos
    if off_policy_batch:
        batch = off_policy(trainer.model, batch)
        g = torch.Generator().manual_seed(1)
        batch["importance_sampling_ratio"] = 0.8 + 0.4 * torch.rand(batch["completion_ids"].shape, generator=g)
        batch["sampling_per_token_logps"] = batch["old_per_token_logps"] - 0.3
    return batch


def fake_device_step(trainer, batch: dict, monkeypatch) -> torch.Tensor:
    """`compute_loss` and backward with the trainer's models and `batch` on the fake device; returns the loss."""
    for model in {trainer.model, trainer.teacher.model, trainer.ref_model} - {None}:
        to_fake_device(model)
    fake_batch = {key: OnDevice(v) if isinstance(v, torch.Tensor) else v for key, v in batch.items()}
    with fake_device_run(monkeypatch):
        loss = trainer.compute_loss(trainer.model, fake_batch)
        loss.backward()
    return loss


@pytest.mark.parametrize("case", CASES)
def test_one_step_runs_on_a_fake_accelerator_device(tmp_path, tokenizer, tiny_model_dir, monkeypatch, case):
    overrides, lora, off_policy_batch = CASES[case]
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, peft_config=LORA if lora else None, **overrides)
    if lora:
        with torch.no_grad():  # LoRA B starts at zero: give the adapter, and so its gradient path, an effect
            for name, p in trainer.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    trainer.callback_handler.on_train_begin(trainer.args, trainer.state, trainer.control)  # LoRA EMA: its adapter
    trainer.model.train()
    checkpointed = []
    if trainer.args.gradient_checkpointing:  # as Trainer.train turns it on, counting the layers it recomputes
        checkpoint = transformers.modeling_utils.checkpoint
        monkeypatch.setattr(transformers.modeling_utils, "checkpoint",
                            lambda *a, **k: checkpointed.append(1) or checkpoint(*a, **k))  # fmt: skip
        trainer.model.gradient_checkpointing_enable(trainer.args.gradient_checkpointing_kwargs)
    trainer.current_gradient_accumulation_steps = 1
    batch = case_batch(trainer, tokenizer, off_policy_batch)
    with torch.no_grad():
        cpu_loss = trainer.compute_loss(trainer.model, batch)

    checkpointed.clear()
    loss = fake_device_step(trainer, batch, monkeypatch)

    assert isinstance(loss, OnDevice) and loss.device == FAKE_DEVICE
    torch.testing.assert_close(loss.elem, cpu_loss, rtol=1e-5, atol=1e-6)  # the fake device computes the same step
    trained = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trained and all(isinstance(p.grad, OnDevice) for p in trained)
    assert any(p.grad.elem.abs().sum() > 0 for p in trained)
    assert bool(checkpointed) == trainer.args.gradient_checkpointing  # the student's layers, on the fake device
    teacher_metric = "rlsd/teacher_minus_sampler_logp" if case == "rlsd" else "sdpg/distill_kl"
    assert trainer._metrics["train"][teacher_metric][-1] != 0  # the teacher took part


def test_a_stray_cpu_tensor_in_the_loss_is_caught(tmp_path, tokenizer, tiny_model_dir, monkeypatch):
    """The bug this file is for: the EOS ids of `distill_exclude_eos` made as a CPU tensor (`torch.tensor(eos_ids)`
    without `device=`) meet the completion ids on the device."""
    isin = torch.isin
    monkeypatch.setattr(torch, "isin", lambda elements, test_elements: isin(elements, test_elements.cpu()))
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, distill_exclude_eos=True)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    with pytest.raises(RuntimeError, match=r"Expected all tensors to be on the same device.*aten\.isin"):
        fake_device_step(trainer, case_batch(trainer, tokenizer, False), monkeypatch)
