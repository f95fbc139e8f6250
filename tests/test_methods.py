"""The baselines as settings of one trainer (SPEC 3): presets, RLSD, OPCD, GRPO, the teacher's weights, and the
optional distillation filters, each checked against a full-logits computation on a hand-built batch."""

from __future__ import annotations

import pytest
import torch
from conftest import make_dataset
from test_trainer import (
    LORA,
    TEMPERATURE,
    assert_grads_close,
    completion_logits,
    grads,
    grpo_options,
    hand_batch,
    make_args,
    make_trainer,
    off_policy,
    parity_reward,
    trainer_loss_and_grads,
)
from trl import GRPOConfig, GRPOTrainer

from sdpg_trl import SDPGConfig, SDPGTrainer
from sdpg_trl.losses import rlsd_advantages, rlsd_lambda, sdpg_loss_reference
from sdpg_trl.teacher import context_token_mask


def reference(trainer, batch, *, teacher_model=None, teacher_ctx=None, **overrides):
    """Full-logits loss and gradients of `trainer`'s method, with the teacher's logits from `teacher_model`."""
    model = trainer.model
    model.zero_grad()
    student = completion_logits(model, batch["prompt_ids"], batch["prompt_mask"], batch)
    with torch.no_grad(), (teacher_ctx or torch.enable_grad)():
        teacher = completion_logits(teacher_model or model, batch["teacher_prompt_ids"], batch["teacher_prompt_mask"],
                                    batch)  # fmt: skip
    args = trainer.args
    kwargs = dict(
        distill_coef=trainer.coefficients_at(trainer.state.global_step).distill_coef, kl_coef=args.beta,
        kl_estimator=args.kl_estimator, gate=args.distill_positive_only,
        ref_per_token_logps=batch.get("ref_per_token_logps"), old_per_token_logps=batch.get("old_per_token_logps"),
        outcome_coef=args.outcome_coef, rlsd_lam=trainer.coefficients_at(trainer.state.global_step).rlsd_lam,
        rlsd_clip=args.rlsd_clip, eos_token_ids=trainer.eos_token_ids if args.distill_exclude_eos else None,
        teacher_confident_only=args.distill_teacher_confident_only, **grpo_options(args),
    )  # fmt: skip
    kwargs.update(overrides)
    loss, metrics = sdpg_loss_reference(student, teacher, batch["completion_ids"], batch["completion_mask"],
                                        batch["advantages"], **kwargs)  # fmt: skip
    loss.backward()
    return loss.detach(), grads(model), metrics


def perturb(model, seed: int = 1) -> None:
    """Move every weight, so a teacher on the initial weights differs from the live policy."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


# ---------------------------------------------------------------------------------------------------------------------
# Settings refused by name (the presets: tests/test_config_surface.py)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"method": "ppo"}, "method"),
        ({"teacher_model_kind": "frozen"}, "teacher_model_kind"),
        ({"teacher_update_rate": 0.0}, "teacher_update_rate"),
        ({"rlsd_clip": 1.5}, "rlsd_clip"),
        ({"rlsd_coef": -0.1}, "rlsd_coef"),
        ({"outcome_coef": 0.0, "distill_coef": 0.0}, "outcome_coef"),
        ({"distill_coef": float("nan")}, "distill_coef"),
        ({"beta": float("inf")}, "beta"),
        ({"rlsd_coef": float("nan")}, "rlsd_coef"),
        ({"temperature": float("nan")}, "temperature"),
        ({"dual_clip": float("nan")}, "dual_clip"),  # an optional float
        ({"learning_rate": float("inf")}, "learning_rate"),  # a TrainingArguments field
        ({"max_grad_norm": float("nan")}, "max_grad_norm"),
        ({"reward_weights": [1.0, float("nan")]}, "reward_weights"),  # a list: a nan weight silently drops its reward
        ({"reward_weights": [float("-inf")]}, "reward_weights"),
    ],
)
def test_bad_method_settings_name_the_field(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=rf"SDPGConfig\.{field}"):
        make_args(tmp_path, **overrides)


# ---------------------------------------------------------------------------------------------------------------------
# RLSD (SPEC 3)
# ---------------------------------------------------------------------------------------------------------------------
def test_rlsd_advantages_by_hand():
    adv = torch.tensor([1.5, -0.5, 0.0])
    teacher = torch.tensor([[-1.0, -30.0], [-1.0, -0.1], [-2.0, -2.0]])
    old = torch.tensor([[-1.1, -1.0], [-0.5, -0.2], [-1.0, -1.0]])
    got = rlsd_advantages(adv, teacher, old, lam=0.4, clip=0.2)
    expected = torch.empty(3, 2)
    for i in range(3):
        for t in range(2):
            delta = max(-20.0, min(20.0, teacher[i, t].item() - old[i, t].item()))
            sign = (adv[i] > 0).float() - (adv[i] < 0).float()
            u = min(1.2, max(0.8, torch.exp(sign * delta).item()))
            expected[i, t] = adv[i] * (0.6 + 0.4 * u)
    torch.testing.assert_close(got, expected)
    assert got[0, 1] == pytest.approx(1.5 * (0.6 + 0.4 * 0.8))  # a far less likely token: weight clipped at 1 - eps
    assert rlsd_lambda(0, 0.5, 50) == 0.5 and rlsd_lambda(25, 0.5, 50) == 0.25 and rlsd_lambda(80, 0.5, 50) == 0.0
    assert rlsd_lambda(80, 0.5, 0) == 0.5


def test_rlsd_rows_the_teacher_did_not_score_keep_their_advantage():
    """A row whose teacher prompt does not fit max_teacher_prompt_length is not scored: weight 1, so A_hat = A."""
    adv, teacher, old = torch.tensor([1.5, -0.5]), torch.zeros(2, 3), -torch.ones(2, 3)
    got = rlsd_advantages(adv, teacher, old, lam=0.4, clip=0.2, scored=torch.tensor([True, False]))
    torch.testing.assert_close(got[0], rlsd_advantages(adv, teacher, old, lam=0.4, clip=0.2)[0])
    torch.testing.assert_close(got[1], torch.full((3,), -0.5))


@pytest.mark.parametrize("off_policy", [False, True])
def test_rlsd_loss_and_gradient_equal_full_logits(tmp_path, tokenizer, tiny_model_dir, off_policy):
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, method="rlsd", rlsd_decay_steps=4)  # fmt: skip
    trainer.state.global_step = 1  # lam = 0.375: both the plain and the reweighted parts matter
    batch = hand_batch(tokenizer)
    batch.pop("ref_per_token_logps")
    if off_policy:
        with torch.no_grad():
            logits = completion_logits(trainer.model, batch["prompt_ids"], batch["prompt_mask"], batch)
            logps = logits.log_softmax(-1).gather(-1, batch["completion_ids"][..., None]).squeeze(-1)
        batch["old_per_token_logps"] = logps + torch.linspace(-0.5, 0.5, logps.numel()).view_as(logps)
    loss, g_trainer = trainer_loss_and_grads(trainer, batch)
    ref_loss, g_ref, _ = reference(trainer, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(g_trainer, g_ref)
    # and the reweighting matters: without it the gradient is GRPO's
    _, g_plain, _ = reference(trainer, batch, rlsd_lam=0.0)
    assert not all(torch.allclose(g_plain[n], g_ref[n]) for n in g_ref)
    logged = trainer._metrics["train"]
    assert logged["rlsd/lambda"][-1] == 0.375 and logged["sdpg/distill_coef"][-1] == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# OPCD: the KL on every rollout, no outcome term
# ---------------------------------------------------------------------------------------------------------------------
def test_opcd_has_no_outcome_gradient(tmp_path, tokenizer, tiny_model_dir):
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, method="opcd")
    batch = hand_batch(tokenizer)
    loss, g_trainer = trainer_loss_and_grads(trainer, batch)
    ref_loss, g_ref, metrics = reference(trainer, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(g_trainer, g_ref)
    assert metrics["gate_ratio"] == 1.0  # no gate
    # the advantages (the only way rewards enter) do not change the gradient at all
    batch["advantages"] = -batch["advantages"] * 3
    _, g_flipped = trainer_loss_and_grads(trainer, batch)
    assert_grads_close(g_flipped, g_trainer, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------------------------------
# GRPO: the same loss, gradient and metrics as TRL's GRPOTrainer, and no teacher at all
# ---------------------------------------------------------------------------------------------------------------------
# GRPO's options for the outcome term, set on both trainers. Each changes GRPO's loss or gradient on the batch (the
# test checks it against the plain `dapo` run), so an option SDPG ignored or got wrong would fail.
GRPO_OPTIONS = {
    "dapo": {},
    "grpo": {"loss_type": "grpo"},
    "bnpo": {"loss_type": "bnpo"},
    "dr_grpo": {"loss_type": "dr_grpo"},
    "cispo": {"loss_type": "cispo", "epsilon_high": 1.1},
    "sapo": {"loss_type": "sapo"},
    "luspo": {"loss_type": "luspo", "importance_sampling_level": "sequence"},
    "vespo": {"loss_type": "vespo"},
    "gspo": {"loss_type": "grpo", "importance_sampling_level": "sequence"},
    "dapo_sequence": {"importance_sampling_level": "sequence"},
    "two_sided_clip": {"delta": 1.15},  # below 1 + epsilon_high, so that it also changes the clip metrics
    "top_entropy_quantile": {"top_entropy_quantile": 0.4},
    "off_policy_mask": {"off_policy_mask_threshold": 0.1},
    # GRPOConfig's default, and the `grpo` preset's, is the bias-corrected KL; these turn it off.
    "no_bias_correction_kl": {"use_bias_correction_kl": False},
    "gspo_no_bias_correction_kl": {"use_bias_correction_kl": False, "loss_type": "grpo",
                                   "importance_sampling_level": "sequence"},
    # GRPO's entropy bonus, with its gradient from SDPG's LM-head pass; on the tokens top_entropy_quantile keeps.
    "entropy_bonus": {"entropy_coef": 0.3},
    "entropy_bonus_top_quantile": {"entropy_coef": 0.3, "top_entropy_quantile": 0.4, "loss_type": "grpo"},
}  # fmt: skip
WINDOWS = dict(gradient_accumulation_steps=2, steps_per_generation=4)  # so that every aggregation's scaling differs


def stock_grpo(path, tiny_model_dir, tokenizer, data, **options) -> GRPOTrainer:
    args = GRPOConfig(
        output_dir=str(path), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
        report_to="none", bf16=False, use_cpu=True, temperature=TEMPERATURE, beta=0.2, **WINDOWS, **options,
    )  # fmt: skip
    return GRPOTrainer(model=tiny_model_dir, reward_funcs=parity_reward, args=args, train_dataset=data,
                       processing_class=tokenizer)  # fmt: skip


def grpo_batch(tokenizer, model=None) -> dict[str, torch.Tensor]:
    """`hand_batch` without teacher prompts; off-policy with old log-probs around `model`'s, when given."""
    batch = hand_batch(tokenizer)
    for key in ("teacher_prompt_ids", "teacher_prompt_mask"):
        batch.pop(key)
    return batch if model is None else off_policy(model, batch, spread=0.6)


@pytest.fixture(scope="module")
def plain_grpo(tmp_path_factory, tokenizer, tiny_model_dir):
    """Stock GRPOTrainer's off-policy loss and gradient with none of the options (`loss_type="dapo"`)."""
    data = make_dataset().remove_columns("privileged_context")
    grpo = stock_grpo(tmp_path_factory.mktemp("plain-grpo"), tiny_model_dir, tokenizer, data)
    return trainer_loss_and_grads(grpo, grpo_batch(tokenizer, grpo.model))


@pytest.mark.parametrize("options", GRPO_OPTIONS.values(), ids=GRPO_OPTIONS.keys())
def test_teacher_off_equals_stock_grpo_trainer(tmp_path, tokenizer, tiny_model_dir, monkeypatch, plain_grpo, options):
    """The `grpo` preset (no teacher) with each of GRPO's options: GRPOTrainer's loss, gradient and metrics."""
    data = make_dataset().remove_columns("privileged_context")  # GRPO needs no privileged context
    args = make_args(tmp_path / "sdpg", method="grpo", beta=0.2, **WINDOWS, **options)
    sdpg = SDPGTrainer(model=tiny_model_dir, reward_funcs=parity_reward, args=args, train_dataset=data,
                       processing_class=tokenizer)  # fmt: skip
    grpo = stock_grpo(tmp_path / "grpo", tiny_model_dir, tokenizer, data, **options)
    monkeypatch.setattr(sdpg.teacher, "hidden", lambda *a, **k: pytest.fail("GRPO ran a teacher forward"))
    batch = grpo_batch(tokenizer, grpo.model)
    loss_sdpg, g_sdpg = trainer_loss_and_grads(sdpg, batch)
    loss_grpo, g_grpo = trainer_loss_and_grads(grpo, batch)
    torch.testing.assert_close(loss_sdpg, loss_grpo, rtol=1e-5, atol=1e-6)
    assert_grads_close(g_sdpg, g_grpo)
    for key, values in grpo._metrics["train"].items():
        assert sdpg._metrics["train"][key][-1] == pytest.approx(values[-1], rel=1e-4, abs=1e-6), key
    plain_loss, plain_grads = plain_grpo
    if options:  # the option does change GRPO's result on this batch
        assert not torch.allclose(loss_grpo, plain_loss) or not all(
            torch.allclose(g_grpo[n], plain_grads[n]) for n in g_grpo
        )  # fmt: skip
    if options.get("loss_type", "dapo") in ("dapo", "grpo"):  # clipping happened, so the clip metrics were compared
        assert 0 < grpo._metrics["train"]["clip_ratio/region_mean"][-1] < 1
    # On-policy the `grpo` preset takes GRPO's ratio form `-A pi / SG[pi]` (`on_policy_surrogate="ratio"`): the
    # same loss and gradient as GRPOTrainer.
    on_policy = grpo_batch(tokenizer)
    (loss_a, grads_a), (loss_b, grads_b) = (trainer_loss_and_grads(t, on_policy) for t in (sdpg, grpo))
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads_a, grads_b)


def test_adaptive_entropy_bonus_equals_stock_grpo_trainer(tmp_path, tokenizer, tiny_model_dir):
    """GRPO's adaptive entropy controller: no bonus in the first window, then the coefficient moves toward the target
    each optimizer step; SDPG's loss, gradient, coefficient and `policy_loss` follow GRPOTrainer's step by step."""
    data = make_dataset().remove_columns("privileged_context")
    options = dict(use_adaptive_entropy=True, entropy_coef=0.3, entropy_target=100.0, entropy_coef_delta=0.1)
    args = make_args(tmp_path / "sdpg", method="grpo", beta=0.2, **WINDOWS, **options)
    sdpg = SDPGTrainer(model=tiny_model_dir, reward_funcs=parity_reward, args=args, train_dataset=data,
                       processing_class=tokenizer)  # fmt: skip
    grpo = stock_grpo(tmp_path / "grpo", tiny_model_dir, tokenizer, data, **options)
    batch = grpo_batch(tokenizer, grpo.model)
    losses = []
    for _ in range(3):
        (loss_a, grads_a), (loss_b, grads_b) = (trainer_loss_and_grads(t, batch) for t in (sdpg, grpo))
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
        assert_grads_close(grads_a, grads_b)
        assert sdpg.entropy_coef == pytest.approx(grpo.entropy_coef)
        losses.append(loss_a.item())
    for key in ("policy_loss", "entropy_coef"):
        assert sdpg._metrics["train"][key] == pytest.approx(grpo._metrics["train"][key], rel=1e-5), key
    assert grpo._metrics["train"]["entropy_coef"] == pytest.approx([0.4, 0.5, 0.6])  # below the target: it grows
    assert losses[0] > losses[1] > losses[2]  # the first window has no bonus, then a growing one


def test_grpo_preset_builds_no_teacher_prompts(tmp_path, tokenizer, tiny_model_dir):
    data = make_dataset().remove_columns("privileged_context")
    args = make_args(tmp_path, method="grpo", beta=0.2)
    sdpg = SDPGTrainer(model=tiny_model_dir, reward_funcs=parity_reward, args=args, train_dataset=data,
                       processing_class=tokenizer)  # fmt: skip
    out = sdpg._generate_and_score_completions([row for row in data for _ in range(4)][:4])
    assert "teacher_prompt_ids" not in out


# ---------------------------------------------------------------------------------------------------------------------
# Which weights score the teacher view
# ---------------------------------------------------------------------------------------------------------------------
def test_base_teacher_reuses_the_reference_model_and_scores_with_the_initial_weights(tmp_path, tokenizer,
                                                                                       tiny_model_dir):  # fmt: skip
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, teacher_model_kind="base")
    assert trainer.teacher.model is trainer.ref_model  # no second copy of the weights when alpha > 0
    perturb(trainer.model)
    batch = hand_batch(tokenizer)
    loss, g_trainer = trainer_loss_and_grads(trainer, batch)
    ref_loss, g_ref, _ = reference(trainer, batch, teacher_model=trainer.ref_model)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(g_trainer, g_ref)
    live_loss, _, _ = reference(trainer, batch)
    assert not torch.allclose(live_loss, ref_loss)


def test_base_teacher_without_reference_model_is_a_frozen_copy(tmp_path, tokenizer, tiny_model_dir):
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, teacher_model_kind="base", beta=0.0)
    assert trainer.ref_model is None and trainer.teacher.model is not None
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()  # two real steps move the policy, not the teacher
    teacher = dict(trainer.teacher.model.named_parameters())
    assert all(torch.equal(teacher[n], initial[n]) for n in initial)
    assert any(not torch.equal(p, initial[n]) for n, p in trainer.model.named_parameters())


def test_ema_teacher_follows_the_policy_at_its_rate(tmp_path, tokenizer, tiny_model_dir):
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, teacher_model_kind="ema", teacher_update_rate=0.25,
                           max_steps=1)  # fmt: skip
    assert trainer.teacher.model is not trainer.ref_model
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    for name, teacher in trainer.teacher.model.named_parameters():
        expected = 0.75 * initial[name] + 0.25 * dict(trainer.model.named_parameters())[name].detach()
        torch.testing.assert_close(teacher, expected)
    batch = hand_batch(tokenizer)
    loss, g_trainer = trainer_loss_and_grads(trainer, batch)
    ref_loss, g_ref, _ = reference(trainer, batch, teacher_model=trainer.teacher.model)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(g_trainer, g_ref)


def test_peft_base_teacher_is_the_model_with_its_adapter_off(tmp_path, tokenizer, tiny_model_dir):
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, peft_config=LORA, beta=0.0, teacher_model_kind="base")
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = hand_batch(tokenizer)
    loss, g_trainer = trainer_loss_and_grads(trainer, batch)
    ref_loss, g_ref, _ = reference(trainer, batch, teacher_ctx=trainer.model.disable_adapter)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(g_trainer, g_ref)
    live_loss, _, _ = reference(trainer, batch)
    assert not torch.allclose(live_loss, ref_loss)


def test_rlsd_takes_a_frozen_teacher_too(tmp_path, tokenizer, tiny_model_dir):
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, method="rlsd",
                           teacher_model_kind="base")  # fmt: skip
    perturb(trainer.model)
    batch = hand_batch(tokenizer)
    batch.pop("ref_per_token_logps")
    loss, g_trainer = trainer_loss_and_grads(trainer, batch)
    ref_loss, g_ref, _ = reference(trainer, batch, teacher_model=trainer.teacher.model)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(g_trainer, g_ref)


def test_teacher_forward_has_dropout_off(tmp_path, tokenizer, tiny_model_dir):
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer)
    for module in trainer.model.modules():  # heavy dropout everywhere it exists
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    trainer.model.config.attention_dropout = 0.5
    for module in trainer.model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    trainer.model.train()
    batch = hand_batch(tokenizer)
    rows = torch.arange(4)
    first = trainer.teacher.hidden(trainer.model, batch, rows)
    second = trainer.teacher.hidden(trainer.model, batch, rows)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert trainer.model.training  # mode restored


# ---------------------------------------------------------------------------------------------------------------------
# Optional distillation filters and diagnostics
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["distill_exclude_eos", "distill_teacher_confident_only"])
def test_distillation_filters_equal_full_logits(tmp_path, tokenizer, tiny_model_dir, option):
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, **{option: True})
    batch = hand_batch(tokenizer)
    batch["completion_ids"][0, 3] = tokenizer.eos_token_id  # an EOS inside a distilled row
    loss, g_trainer = trainer_loss_and_grads(trainer, batch)
    ref_loss, g_ref, _ = reference(trainer, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(g_trainer, g_ref)
    plain_loss, _, _ = reference(trainer, batch, eos_token_ids=None, teacher_confident_only=False)
    assert not torch.allclose(plain_loss, ref_loss)  # the filter removed some of the KL
    assert 0 < trainer._metrics["train"]["sdpg/distilled_token_share"][-1] < 1


def test_context_token_mask_marks_completion_tokens_found_in_the_context(tokenizer):
    ids = torch.tensor([tokenizer.convert_tokens_to_ids(["the", "answer", "is", "7"]),
                        tokenizer.convert_tokens_to_ids(["3", "plus", "4", "."])])  # fmt: skip
    mask = context_token_mask(ids, ["the answer is 7 .", "the answer is 12 ."], tokenizer)
    assert mask.tolist() == [[True, True, True, True], [False, False, False, True]]


def test_term_gradient_norms_are_logged(tmp_path, tokenizer, tiny_model_dir):
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, log_term_grad_norms=True)
    batch = hand_batch(tokenizer)
    trainer_loss_and_grads(trainer, batch)
    logged = trainer._metrics["train"]
    assert all(logged[f"grad_norm/{name}"][-1] > 0 for name in ("outcome", "distill", "anchor"))
    # the distillation term's norm scales with its coefficient
    first = logged["grad_norm/distill"][-1]
    trainer.args.distill_coef *= 2
    trainer_loss_and_grads(trainer, batch)
    assert logged["grad_norm/distill"][-1] == pytest.approx(2 * first, rel=1e-5)
    # a step where no term has a gradient (all advantages 0, no anchor) logs zeros instead of failing
    trainer.beta = 0.0
    batch["advantages"] = torch.zeros(4)
    trainer_loss_and_grads(trainer, batch)
    assert logged["grad_norm/outcome"][-1] == logged["grad_norm/distill"][-1] == 0.0


def test_teacher_templates_are_named_in_the_config_and_in_sdpg_evaluate(tmp_path):
    from sdpg_trl.config import ANSWER_CHECK_TEACHER_TEMPLATE, DEFAULT_TEACHER_TEMPLATE
    from sdpg_trl.scripts.evaluate import EvaluateArguments

    args = SDPGConfig(str(tmp_path), teacher_template="answer_check", context_column="answer", use_cpu=True)
    assert args.teacher_template == ANSWER_CHECK_TEACHER_TEMPLATE
    assert (
        SDPGConfig(str(tmp_path), teacher_template="default", use_cpu=True).teacher_template
        == DEFAULT_TEACHER_TEMPLATE
    )
    assert (
        SDPGConfig(str(tmp_path), teacher_template=" hint: {context}", use_cpu=True).teacher_template
        == " hint: {context}"
    )
    with pytest.raises(ValueError, match="must contain the placeholder"):  # a misspelt name is text without {context}
        SDPGConfig(str(tmp_path), teacher_template="answer-check", use_cpu=True)
    evaluate = EvaluateArguments(model_name_or_path="m", teacher_template="answer_check")
    assert evaluate.teacher_template == ANSWER_CHECK_TEACHER_TEMPLATE
