"""Non-finite values never reach the weights (issue 10, section 1): a bad step is skipped, counted, warned about, and
too many in a row stop training."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from conftest import make_dataset
from test_trainer import make_args, parity_reward
from transformers import AutoModelForCausalLM

from sdpg_trl import SDPGTrainer
from sdpg_trl.guards import StepGuard, reward_fault

# Every rollout is distilled, so the teacher forward runs at every step whatever the advantages.
GUARD_ARGS = dict(distill_positive_only=False, max_steps=2)


def reward(completions, trainer_state, **kwargs):
    """parity_reward, poisoned at the steps in `reward.poison` (1-based, as logged) with the value `reward.value`."""
    rewards = parity_reward(completions)
    if trainer_state.global_step + 1 in reward.poison:
        rewards = [reward.value] * len(rewards) if reward.value is None else [reward.value, *rewards[1:]]
    return rewards


reward.poison, reward.value = set(), None


def run(tmp_path, tokenizer, model_dir, poison=None, steps=(2,), **overrides):
    """Train with `poison(trainer, steps)` applied; returns the trainer."""
    trainer = SDPGTrainer(
        model=model_dir, reward_funcs=reward, args=make_args(tmp_path, **{**GUARD_ARGS, **overrides}),
        train_dataset=make_dataset(), processing_class=tokenizer,
    )  # fmt: skip
    if poison is not None:
        poison(trainer, set(steps))
    trainer.train()
    return trainer


def at_poisoned_step(trainer, steps) -> bool:
    return trainer.state.global_step + 1 in steps  # global_step counts finished steps


def nan_teacher(trainer, steps):
    original = trainer.teacher.hidden

    def teacher_hidden(*args, **kwargs):
        hidden = original(*args, **kwargs)
        if at_poisoned_step(trainer, steps):
            hidden = hidden.clone()
            hidden[0, 0, 0] = float("nan")
        return hidden

    trainer.teacher.hidden = teacher_hidden


def inf_reward(trainer, steps):
    reward.poison, reward.value = steps, float("inf")


def no_reward(trainer, steps):
    reward.poison, reward.value = steps, None  # every reward function returns None for every completion


def minus_inf_reference(trainer, steps):
    """A poisoned batch: the reference log-probs underflowed to -inf, so the anchor (and the loss) is infinite."""
    original = trainer._generate_and_score_completions

    def generate(inputs):
        out = original(inputs)
        if at_poisoned_step(trainer, steps):
            out["ref_per_token_logps"] = torch.full_like(out["ref_per_token_logps"], -float("inf"))
        return out

    trainer._generate_and_score_completions = generate


def nan_gradient(trainer, steps):
    """A finite loss whose gradient is NaN in one tensor."""
    weight = trainer.model.get_output_embeddings().weight
    weight.register_hook(lambda g: g * float("nan") if at_poisoned_step(trainer, steps) else g)


@pytest.fixture(autouse=True)
def clean_reward():
    reward.poison, reward.value = set(), None
    yield
    reward.poison, reward.value = set(), None


@pytest.fixture(scope="module")
def one_clean_step(tmp_path_factory, tokenizer, tiny_model_dir):
    """The run without the bad step: the same seed and data, stopped after its first (clean) step."""
    trainer = run(tmp_path_factory.mktemp("clean"), tokenizer, tiny_model_dir, max_steps=1)
    (log,) = [h for h in trainer.state.log_history if "loss" in h]
    # With nothing skipped, the logged loss is the Trainer's own.
    assert log["loss"] == pytest.approx(trainer._total_loss_scalar, rel=1e-6) and log["skipped_steps"] == 0
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, log["loss"]


@pytest.mark.parametrize(
    ("poison", "reason"),
    [
        (nan_teacher, "the loss is not finite (nan)"),
        (inf_reward, "reward function 'reward' returned inf for 1 of 4 completions"),
        (no_reward, "no completion has a reward"),
        (minus_inf_reference, "the loss is not finite"),
        (nan_gradient, "a gradient is not finite"),
    ],
)
def test_bad_step_is_skipped_and_weights_equal_the_run_without_it(
    tmp_path, tokenizer, tiny_model_dir, one_clean_step, caplog, poison, reason
):
    clean_weights, clean_loss = one_clean_step
    with caplog.at_level(logging.WARNING, logger="sdpg_trl.guards"):
        trainer = run(tmp_path, tokenizer, tiny_model_dir, poison, steps=(2,), logging_steps=2)
    weights = dict(trainer.model.named_parameters())
    for name, clean in clean_weights.items():
        assert torch.isfinite(weights[name]).all(), name
        assert torch.equal(weights[name], clean), name  # step 2 changed nothing
    assert trainer.state.global_step == 2
    assert trainer.lr_scheduler.last_epoch == 1  # the scheduler stepped for step 1 only
    assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {1}  # Adam saw one update
    (log,) = [h for h in trainer.state.log_history if "loss" in h]
    # The window holds steps 1 and 2: the loss logged is step 1's, the one optimised (not halved, not 0.0).
    assert (log["step"], log["skipped_steps"]) == (2, 1)
    assert log["loss"] == clean_loss
    assert trainer.state.log_history[-1]["train_loss"] == clean_loss
    assert f"SDPG skipped optimizer step 2 because {reason}" in caplog.text


def test_consecutive_skips_stop_training(tmp_path, tokenizer, tiny_model_dir, caplog):
    # Steps 2, 4 and 5 are bad: step 3 resets the count, so training stops at step 5, the second skip in a row.
    trainer = SDPGTrainer(
        model=tiny_model_dir, reward_funcs=reward, processing_class=tokenizer, train_dataset=make_dataset(),
        args=make_args(tmp_path, **{**GUARD_ARGS, "max_steps": 5, "max_consecutive_skipped_steps": 2}),
    )  # fmt: skip
    nan_teacher(trainer, {2, 4, 5})
    with caplog.at_level(logging.WARNING, logger="sdpg_trl.guards"):
        with pytest.raises(RuntimeError, match=r"2 optimizer steps in a row \(steps 4-5\).*the loss is not finite"):
            trainer.train()
    assert "step 2 because" in caplog.text and "step 4 because" in caplog.text
    logs = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    assert logs[2]["loss"] is None and logs[2]["skipped_steps"] == 1  # a window with no optimised step
    assert math.isfinite(logs[3]["loss"]) and logs[4]["skipped_steps"] == 2
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.parametrize("scaler", [False, True])
def test_skip_makes_one_accelerated_step_a_noop_marked_as_skipped(scaler):
    """Both of accelerate's step paths: plain, and mixed precision with a GradScaler (its bookkeeping stays valid)."""
    accelerator = Accelerator(cpu=True)
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = AcceleratedOptimizer(
        torch.optim.SGD([param], lr=0.1), scaler=torch.amp.GradScaler("cpu") if scaler else None
    )
    accelerator._optimizers.append(optimizer)
    guard = StepGuard(max_consecutive_skipped_steps=3)
    for skip in (True, False):
        before = param.detach().clone()
        param.grad = None
        loss = param.sum()
        if scaler:
            optimizer.scaler.scale(loss).backward()
            optimizer.scaler.unscale_(optimizer.optimizer)  # as gradient clipping does before the step
        else:
            loss.backward()
        if skip:
            guard._skip_optimizer_step(optimizer)
        optimizer.step()
        assert accelerator.optimizer_step_was_skipped is skip
        assert torch.equal(param, before) is skip
        if skip:
            guard._restore_optimizer()
            guard._restore_optimizer = None


def test_reward_fault_keeps_grpo_none_semantics():
    names = ["a", "b"]
    nan, inf = float("nan"), float("inf")
    assert reward_fault(torch.tensor([[1.0, nan], [nan, nan], [0.0, 2.0]]), names) is None  # None = not applicable
    fault = reward_fault(torch.tensor([[1.0, -inf], [0.0, inf]]), names)
    assert fault == "reward function 'b' returned inf for 2 of 2 completions"
    assert "'a', 'b'" in reward_fault(torch.full((3, 2), nan), names)


def test_step_whose_gradient_norm_overflows_is_skipped(tmp_path, tokenizer, tiny_model_dir, caplog):
    """distill_coef 1e30: the loss and every gradient entry are finite, but their total norm overflows to inf, and
    clipping would scale the step to 0 while the optimizer and the scheduler still stepped. Both steps are skipped."""
    initial = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    with caplog.at_level(logging.WARNING, logger="sdpg_trl.guards"):
        trainer = run(tmp_path, tokenizer, tiny_model_dir, distill_coef=1e30, max_consecutive_skipped_steps=3)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["grad_norm"] for h in logs] == [math.inf, math.inf]
    assert [h["skipped_steps"] for h in logs] == [1, 2] and all(h["loss"] is None for h in logs)
    assert trainer.lr_scheduler.last_epoch == 0 and not trainer.optimizer.state  # neither stepped
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, initial[name]), name
    assert "SDPG skipped optimizer step 1 because the gradient norm is not finite (inf)" in caplog.text
