"""docs/EXTENDING.md's four extensions, each added from outside the package (here, not in `sdpg_trl/`) and trained
for a step: an anchor estimator, an outcome loss type, a teacher kind and a method preset."""

from __future__ import annotations

import pytest
import torch
from test_methods import reference
from test_trainer import (
    assert_grads_close,
    hand_batch,
    make_args,
    make_trainer,
    off_policy,
    reference_loss_and_grads,
    trainer_loss_and_grads,
)

from sdpg_trl import SDPGConfig
from sdpg_trl.checkpoints import loss_shaping_fields
from sdpg_trl.config import METHODS, MethodPreset
from sdpg_trl.losses import (
    ANCHOR_ESTIMATORS,
    LOSS_TYPES,
    SEQUENCE_SUM,
    OutcomeOptions,
    SurrogateInputs,
    register_anchor_estimator,
    register_loss_type,
)
from sdpg_trl.model_card import METHOD_CARDS, SDPG_PAPER, MethodCard
from sdpg_trl.parser import SDPGParser
from sdpg_trl.teachers import TEACHER_KINDS, Teacher, register_teacher_kind


@pytest.fixture
def registries():
    """Undo what a test registers, so that every other test sees the package's own registries."""
    saved = [(registry, dict(registry)) for registry in (ANCHOR_ESTIMATORS, LOSS_TYPES, TEACHER_KINDS, METHODS,
                                                          METHOD_CARDS)]  # fmt: skip
    yield
    for registry, entries in saved:
        registry.clear()
        registry.update(entries)


def train_one_step(trainer) -> None:
    trainer.train()
    assert trainer.state.global_step == 1
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses[0]))


def test_an_anchor_estimator_added_from_outside(tmp_path, tokenizer, tiny_model_dir, registries):
    @register_anchor_estimator("clipped_urkl", formula="`0.5 clip(log w, -1, 1)^2`")
    def clipped_urkl(log_w: torch.Tensor) -> torch.Tensor:
        return 0.5 * log_w.clamp(-1.0, 1.0).square()

    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, kl_estimator="clipped_urkl", max_steps=1)
    batch = hand_batch(tokenizer)
    loss, g_trainer = trainer_loss_and_grads(trainer, batch)
    ref_loss, g_ref, ref_metrics = reference_loss_and_grads(trainer, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(g_trainer, g_ref)
    assert trainer._metrics["train"]["sdpg/anchor"][-1] == pytest.approx(ref_metrics["anchor"], rel=1e-4)
    # The reference log-probs are far from the policy's: the clip is active, so this is not `urkl`.
    urkl = make_trainer(tmp_path / "urkl", tiny_model_dir, tokenizer, kl_estimator="urkl")
    assert not torch.isclose(trainer_loss_and_grads(urkl, batch)[0], loss)
    train_one_step(trainer)


def test_an_outcome_loss_type_added_from_outside(tmp_path, tokenizer, tiny_model_dir, registries):
    @register_loss_type(
        "clipped_reinforce", aggregation=SEQUENCE_SUM, reads=("epsilon", "epsilon_high"), reinforce_on_policy=False,
        formula="`-SG[clip(w, 1 - eps_low, 1 + eps_high)] A log pi`",
    )  # fmt: skip
    def clipped_reinforce(x: SurrogateInputs, options: OutcomeOptions) -> tuple[torch.Tensor, None]:
        weight = x.ratio.clamp(1 - options.epsilon_low, 1 + options.epsilon_high).detach()
        return -weight * x.advantages * x.logps, None

    # Not registered as PPO's clipped ratio: SDPG's filled dual_clip gives way, and one the user wrote is refused.
    assert make_args(tmp_path, loss_type="clipped_reinforce").dual_clip is None
    with pytest.raises(ValueError, match="dual_clip must be None with loss_type='clipped_reinforce'"):
        make_args(tmp_path, loss_type="clipped_reinforce", dual_clip=3.0)
    args = dict(loss_type="clipped_reinforce", dual_clip=None, epsilon=0.1, max_steps=1)
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, **args)
    assert {"epsilon", "epsilon_high"} <= set(loss_shaping_fields())
    batch = off_policy(trainer.model, hand_batch(tokenizer, seed=1))  # ratios away from 1: the clip matters
    loss, g_trainer = trainer_loss_and_grads(trainer, batch)
    ref_loss, g_ref, _ = reference_loss_and_grads(trainer, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(g_trainer, g_ref)
    train_one_step(trainer)


def test_a_teacher_kind_added_from_outside(tmp_path, tokenizer, tiny_model_dir, registries):
    @register_teacher_kind
    class InitialCopyTeacher(Teacher):
        """A frozen copy of the initial weights, even where `base` would reuse the reference model."""

        kind = "initial_copy"
        needs_initial_weights = True

        def setup(self) -> None:
            self.model = self._frozen_copy()

    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, teacher_model_kind="initial_copy", max_steps=1)
    assert isinstance(trainer.teacher, InitialCopyTeacher)
    assert trainer.teacher.model is not None and trainer.teacher.model is not trainer.ref_model
    batch = hand_batch(tokenizer)
    with torch.no_grad():  # a teacher other than the policy: its weights must be the ones that score
        next(trainer.teacher.model.parameters()).add_(0.05)
    loss, g_trainer = trainer_loss_and_grads(trainer, batch)
    ref_loss, g_ref, _ = reference(trainer, batch, teacher_model=trainer.teacher.model)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(g_trainer, g_ref)
    train_one_step(trainer)


def test_a_method_preset_added_from_outside(tmp_path, tokenizer, tiny_model_dir, registries):
    METHODS["sdpg_k3_ungated"] = MethodPreset(defines={"kl_estimator": "k3"}, fills={"distill_positive_only": False})
    METHOD_CARDS["sdpg_k3_ungated"] = MethodCard("SDPG (k3 anchor, no gate)", SDPG_PAPER, ["sdpg"])
    args = make_args(tmp_path, method="sdpg_k3_ungated")
    assert args.kl_estimator == "k3" and args.distill_positive_only is False
    with pytest.raises(ValueError, match="kl_estimator"):
        make_args(tmp_path, method="sdpg_k3_ungated", kl_estimator="urkl")
    (parsed,) = SDPGParser(SDPGConfig).parse_args_and_config(
        ["--method", "sdpg_k3_ungated", "--output_dir", str(tmp_path), "--use_cpu", "true", "--bf16", "false"]
    )
    assert parsed.kl_estimator == "k3"
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, method="sdpg_k3_ungated", max_steps=1)
    assert trainer._name == "SDPG (k3 anchor, no gate)"
    train_one_step(trainer)
