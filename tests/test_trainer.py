"""SDPGTrainer against the plain-PyTorch reference and against stock GRPOTrainer, plus real training runs."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from conftest import make_dataset
from datasets import Dataset
from peft import LoraConfig
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from trl import GRPOConfig, GRPOTrainer

import sdpg_trl.head_kernels
import sdpg_trl.trainer
from sdpg_trl import SDPGConfig, SDPGTrainer
from sdpg_trl._trl_compat import compute_dtype
from sdpg_trl.losses import OutcomeOptions, distill_coef_schedule, sdpg_loss_reference
from sdpg_trl.preflight import vision_language_signs
from sdpg_trl.teacher import build_teacher_prompt

TEMPERATURE = 0.8


def parity_reward(completions, **kwargs):
    """A cheap reward with spread inside each group, so advantages (and the gate) are non-trivial."""
    return [float(len(c[0]["content"]) % 2) for c in completions]


def make_args(tmp_path, **overrides) -> SDPGConfig:
    kwargs = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
        max_steps=2, logging_steps=1, report_to="none", save_strategy="no", bf16=False, use_cpu=True,
        temperature=TEMPERATURE, distill_warmup_steps=0, distill_decay_steps=0, distill_coef=0.5, beta=0.1,
        learning_rate=1e-2, seed=0,
    )  # fmt: skip
    if "method" in overrides:  # a method's preset fills its own distill_coef and beta
        del kwargs["distill_coef"], kwargs["beta"]
    kwargs.update(overrides)
    return SDPGConfig(**kwargs)


LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def make_trainer(tmp_path, model, tokenizer, peft_config=None, **overrides) -> SDPGTrainer:
    return SDPGTrainer(
        model=model, reward_funcs=parity_reward, args=make_args(tmp_path, **overrides),
        train_dataset=make_dataset(), processing_class=tokenizer, peft_config=peft_config,
    )  # fmt: skip


def hand_batch(tokenizer, seed: int = 0) -> dict[str, torch.Tensor]:
    """A GRPO-style batch: left-padded prompts and teacher prompts, right-padded completions, mixed advantages."""
    g = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    prompt_ids = torch.randint(6, vocab, (4, 5), generator=g)
    prompt_mask = torch.ones(4, 5, dtype=torch.long)
    prompt_mask[0, :2] = 0
    teacher_prompt_ids = torch.randint(6, vocab, (4, 9), generator=g)
    teacher_prompt_mask = torch.ones(4, 9, dtype=torch.long)
    teacher_prompt_mask[1, :3] = 0
    completion_ids = torch.randint(6, vocab, (4, 7), generator=g)
    completion_mask = torch.ones(4, 7, dtype=torch.long)
    completion_mask[2, 4:] = 0
    completion_mask[3, 6:] = 0
    for ids, mask in ((prompt_ids, prompt_mask), (teacher_prompt_ids, teacher_prompt_mask),
                      (completion_ids, completion_mask)):  # fmt: skip
        ids[mask == 0] = tokenizer.pad_token_id
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "teacher_prompt_ids": teacher_prompt_ids, "teacher_prompt_mask": teacher_prompt_mask,
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "advantages": torch.tensor([0.9, -0.3, 1.2, -1.8]),
        "num_items_in_batch": completion_mask.sum(),
        "ref_per_token_logps": -torch.rand(4, 7, generator=g) * 4 - 2,
    }  # fmt: skip


def completion_logits(model, prompt_ids, prompt_mask, batch) -> torch.Tensor:
    """(B, C, V) temperature-scaled logits predicting the completion tokens, from the model's ordinary forward."""
    ids = torch.cat([prompt_ids, batch["completion_ids"]], dim=1)
    mask = torch.cat([prompt_mask, batch["completion_mask"]], dim=1)
    c = batch["completion_ids"].size(1)
    return model(input_ids=ids, attention_mask=mask).logits[:, -c - 1 : -1] / TEMPERATURE


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def trainer_loss_and_grads(trainer, batch):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), grads(trainer.model)


def reference_loss_and_grads(trainer, batch, model=None):
    model = model or trainer.model
    model.zero_grad()
    student = completion_logits(model, batch["prompt_ids"], batch["prompt_mask"], batch)
    with torch.no_grad():
        teacher = completion_logits(model, batch["teacher_prompt_ids"], batch["teacher_prompt_mask"], batch)
    args = trainer.args
    loss, metrics = sdpg_loss_reference(
        student, teacher, batch["completion_ids"], batch["completion_mask"], batch["advantages"],
        distill_coef=args.distill_coef, kl_coef=args.beta, kl_estimator=args.kl_estimator,
        gate=args.distill_positive_only, ref_per_token_logps=batch.get("ref_per_token_logps"),
        old_per_token_logps=batch.get("old_per_token_logps"), **grpo_options(args),
    )  # fmt: skip
    loss.backward()
    return loss.detach(), grads(model), metrics


def grpo_options(args: SDPGConfig) -> dict:
    """`sdpg_loss_reference`'s arguments for the GRPO options of `args` (one accumulation step)."""
    return dict(
        outcome=OutcomeOptions.from_config(args),
        anchor_ratio_weighted=args.anchor_ratio_weighted,
        bias_correction_kl=args.use_bias_correction_kl,
        max_completion_length=args.max_completion_length,
    )


def off_policy(model, batch, spread: float = 0.5) -> dict[str, torch.Tensor]:
    """`batch` with old log-probs around the model's: ratios inside and outside the clip range, for both signs of A."""
    with torch.no_grad():
        logits = completion_logits(model, batch["prompt_ids"], batch["prompt_mask"], batch)
        logps = logits.log_softmax(-1).gather(-1, batch["completion_ids"][..., None]).squeeze(-1)
    return {**batch, "old_per_token_logps": logps + torch.linspace(-spread, spread, logps.numel()).view_as(logps)}


def assert_grads_close(a: dict, b: dict, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------------------------------
# The chunked trainer loss equals the plain reference (SPEC 2, SPEC 5)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [1, 5, 64])  # 5 does not divide the 19 distilled tokens; 64 > all of them
@pytest.mark.parametrize("estimator", ["urkl", "ufkl"])
def test_trainer_loss_equals_reference(tmp_path, tokenizer, tiny_model_dir, chunk_size, estimator):
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, distill_chunk_size=chunk_size, kl_estimator=estimator)
    batch = hand_batch(tokenizer)
    loss, g_trainer = trainer_loss_and_grads(trainer, batch)
    ref_loss, g_ref, ref_metrics = reference_loss_and_grads(trainer, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(g_trainer, g_ref)
    logged = {k.removeprefix("sdpg/"): v[-1] for k, v in trainer._metrics["train"].items()}
    for key in ("distill_kl", "gate_ratio", "teacher_minus_student_logp", "anchor", "kl"):
        assert logged[key] == pytest.approx(ref_metrics[key], rel=1e-4, abs=1e-6), key
    assert logged["distill_coef"] == trainer.args.distill_coef
    assert ref_metrics["distill_kl"] > 0


def test_trainer_loss_equals_reference_off_policy_and_ungated(tmp_path, tokenizer, tiny_model_dir):
    """Also under gradient checkpointing, which recomputes the student forward whose hidden states the KL uses."""
    trainer = make_trainer(
        tmp_path, tiny_model_dir, tokenizer, distill_positive_only=False, distill_chunk_size=3,
        gradient_checkpointing=True,
    )  # fmt: skip
    batch = off_policy(trainer.model, hand_batch(tokenizer, seed=1))
    loss, g_trainer = trainer_loss_and_grads(trainer, batch)
    ref_loss, g_ref, _ = reference_loss_and_grads(trainer, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(g_trainer, g_ref)


@pytest.mark.parametrize(
    "options",
    [
        {"loss_type": "grpo"},
        {"loss_type": "sapo", "dual_clip": None},
        {"loss_type": "cispo", "dual_clip": None, "epsilon_high": 1.1},
        {"importance_sampling_level": "sequence"},
        {"loss_type": "dr_grpo", "use_bias_correction_kl": True, "anchor_ratio_weighted": False},
    ],
    ids=["grpo", "sapo", "cispo", "sequence", "dr_grpo_bias_correction_kl"],
)
def test_trainer_with_grpo_options_equals_reference(tmp_path, tokenizer, tiny_model_dir, options):
    """With the teacher on: the outcome and the anchor aggregated by loss_type, the distillation over N (SPEC 2)."""
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, distill_chunk_size=3, **options)
    batch = off_policy(trainer.model, hand_batch(tokenizer, seed=1))
    loss, g_trainer = trainer_loss_and_grads(trainer, batch)
    ref_loss, g_ref, ref_metrics = reference_loss_and_grads(trainer, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(g_trainer, g_ref)
    logged = trainer._metrics["train"]
    assert logged["kl"][-1] == pytest.approx(ref_metrics["kl"], rel=1e-4) and ref_metrics["distill_kl"] > 0


def test_peft_teacher_uses_the_adapter(tmp_path, tokenizer, tiny_model_dir):
    """With LoRA the teacher is the same adapted model: the loss still equals the reference on the adapted logits."""
    peft_trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, peft_config=LORA, beta=0.0)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter change the model
        for name, p in peft_trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = hand_batch(tokenizer)
    loss, g_trainer = trainer_loss_and_grads(peft_trainer, batch)
    ref_loss, g_ref, _ = reference_loss_and_grads(peft_trainer, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(g_trainer, g_ref)
    with peft_trainer.model.disable_adapter():
        base_loss, _, _ = reference_loss_and_grads(peft_trainer, batch)
    assert not torch.allclose(base_loss, ref_loss)  # so the adapter really is part of what was compared


@pytest.mark.parametrize(("cast_lm_head_to_fp32", "expected"), [(False, torch.bfloat16), (True, torch.float32)])
def test_head_kernels_project_in_the_mixed_precision_dtype(tmp_path, tokenizer, tiny_model_dir, monkeypatch,
                                                            cast_lm_head_to_fp32, expected):  # fmt: skip
    """Under bf16 mixed precision the LM-head kernels project in bf16, as TRL's fused head does inside GRPO's
    forward, although they run after SDPG's; `cast_lm_head_to_fp32` keeps them in fp32, as it does GRPO's."""
    seen = []

    def spy(hidden):  # the dtype the student's pass (all its tokens, distilled or not) projects in
        seen.append(compute_dtype(hidden))
        return seen[-1]

    monkeypatch.setattr(sdpg_trl.head_kernels, "_compute_dtype", spy)
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, bf16=True, cast_lm_head_to_fp32=cast_lm_head_to_fp32)
    loss, g_trainer = trainer_loss_and_grads(trainer, hand_batch(tokenizer))  # rows 0 and 2 distilled, 1 and 3 not
    assert seen == [expected]
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in g_trainer.values())


# ---------------------------------------------------------------------------------------------------------------------
# SPEC 2.4 consequence: beta_base = 0 and ufkl is GRPO with the same KL coefficient and aggregation
# ---------------------------------------------------------------------------------------------------------------------
def test_zero_distillation_ufkl_gradient_equals_stock_grpo(tmp_path, tokenizer, tiny_model_dir):
    # Accumulation and generation windows that differ, so that DAPO's normaliser is exercised too.
    windows = dict(gradient_accumulation_steps=2, steps_per_generation=4)
    sdpg = make_trainer(
        tmp_path / "sdpg", tiny_model_dir, tokenizer, distill_coef=0.0, kl_estimator="ufkl", beta=0.2, **windows
    )
    grpo_args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
        report_to="none", bf16=False, use_cpu=True, temperature=TEMPERATURE, beta=0.2, loss_type="dapo", **windows,
        use_bias_correction_kl=False,  # TRL's default multiplies the k3 term by a differentiable ratio
    )  # fmt: skip
    grpo = GRPOTrainer(
        model=tiny_model_dir, reward_funcs=parity_reward, args=grpo_args, train_dataset=make_dataset(),
        processing_class=tokenizer,
    )  # fmt: skip
    batch = hand_batch(tokenizer)
    _, g_sdpg = trainer_loss_and_grads(sdpg, batch)
    _, g_grpo = trainer_loss_and_grads(grpo, batch)
    assert_grads_close(g_sdpg, g_grpo)
    # and the distillation does change the gradient once switched on
    sdpg.args.distill_coef = 0.5
    _, g_distilled = trainer_loss_and_grads(sdpg, batch)
    assert not all(torch.allclose(g_distilled[n], g_grpo[n]) for n in g_grpo)


# ---------------------------------------------------------------------------------------------------------------------
# Data path: teacher prompt = student prompt + hint, tokenised with the same chat template
# ---------------------------------------------------------------------------------------------------------------------
def test_teacher_inputs_built_from_context_column(tmp_path, tokenizer, tiny_model_dir):
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, teacher_template=" hint : {context}")
    rows = [row for row in make_dataset(2) for _ in range(4)]
    trainer.model.train()
    out = trainer._generate_and_score_completions(rows)
    for i, row in enumerate(rows):
        ids = out["teacher_prompt_ids"][i][out["teacher_prompt_mask"][i].bool()].tolist()
        expected = tokenizer.apply_chat_template(
            build_teacher_prompt(row["prompt"], row["privileged_context"], " hint : {context}", "c"),
            add_generation_prompt=True, tokenize=True, return_dict=False,
        )  # fmt: skip
        assert ids == list(expected)
        assert "hint" in tokenizer.decode(ids) and row["privileged_context"].split()[-2] in tokenizer.decode(ids)
        # left padding, so the completion that follows sits right after the prompt's last token
        assert out["teacher_prompt_mask"][i, -1] == 1


def test_build_teacher_prompt_shapes():
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    teacher = build_teacher_prompt(prompt, "4", "\nhint: {context}", "ctx")
    assert teacher[0] == prompt[0] and teacher[1]["content"] == "2+2?\nhint: 4"
    assert prompt[1]["content"] == "2+2?"  # the student's prompt is not mutated
    assert build_teacher_prompt("2+2?", "4", " [{context}]", "ctx") == "2+2? [4]"
    with pytest.raises(ValueError, match="'ctx'"):
        build_teacher_prompt("2+2?", None, "{context}", "ctx")


# ---------------------------------------------------------------------------------------------------------------------
# Real training runs
# ---------------------------------------------------------------------------------------------------------------------
SDPG_METRICS = (
    "sdpg/distill_kl",
    "sdpg/distill_coef",
    "sdpg/gate_ratio",
    "sdpg/anchor",
    "sdpg/teacher_minus_student_logp",
)


def test_train_full_finetuning_updates_weights_and_logs(tmp_path, tokenizer, tiny_model_dir):
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, max_steps=3)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)]
    assert len(changed) == len(before)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for key in (*SDPG_METRICS, "kl", "entropy", "reward"):
        assert all(key in h for h in logs), key
    assert any(h["sdpg/distill_kl"] > 0 for h in logs)


def test_train_peft_lora_updates_adapter_only(tmp_path, tokenizer, tiny_model_dir):
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, peft_config=LORA, max_steps=2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    assert lora and any(not torch.equal(before[n], after[n]) for n in lora)
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n)
    assert all(key in trainer.state.log_history[0] for key in SDPG_METRICS)


def test_schedule_follows_optimizer_steps_and_survives_resume(tmp_path, tokenizer, tiny_model_dir):
    overrides = dict(max_steps=4, distill_warmup_steps=2, distill_decay_steps=2, save_strategy="steps", save_steps=2)
    expected = [distill_coef_schedule(k, 4, 0.5, 2, 2) for k in range(4)]  # 0, 0.25, 0.5, 0.25
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, **overrides)
    trainer.train()
    full = [h["sdpg/distill_coef"] for h in trainer.state.log_history if "loss" in h]
    assert full == pytest.approx(expected)

    resumed = make_trainer(tmp_path, tiny_model_dir, tokenizer, **overrides)
    resumed.train(resume_from_checkpoint=os.path.join(tmp_path, "checkpoint-2"))
    tail = [h["sdpg/distill_coef"] for h in resumed.state.log_history if "loss" in h and h["step"] > 2]
    assert tail == pytest.approx(expected[2:])
    saved = json.load(open(os.path.join(tmp_path, "checkpoint-2", "trainer_state.json")))
    assert saved["global_step"] == 2


# ---------------------------------------------------------------------------------------------------------------------
# Bad input fails early and names what is wrong
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("native", [False, True])
def test_cpu_bf16_without_hardware_support_warns(tmp_path, tokenizer, tiny_model_dir, monkeypatch, caplog, native):
    monkeypatch.setattr("sdpg_trl.preflight.cpu_has_native_bf16", lambda: native)
    with caplog.at_level(logging.WARNING, logger="sdpg_trl.preflight"):
        make_trainer(tmp_path, tiny_model_dir, tokenizer, bf16=True)
    assert ("SDPGConfig.bf16" in caplog.text) is not native
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdpg_trl.preflight"):
        make_trainer(tmp_path, tiny_model_dir, tokenizer, bf16=False)
    assert "SDPGConfig.bf16" not in caplog.text


def test_cpu_bf16_from_the_accelerate_config_warns_naming_it(tmp_path, tokenizer, tiny_model_dir, monkeypatch, caplog):
    # TRL's accelerate configs set mixed_precision: bf16; with bf16: false in the recipe the run is still bf16.
    monkeypatch.setattr("sdpg_trl.preflight.cpu_has_native_bf16", lambda: False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # as `accelerate launch --config_file zero2.yaml`
    with caplog.at_level(logging.WARNING, logger="sdpg_trl.preflight"):
        trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, bf16=False)
    assert trainer.accelerator.mixed_precision == "bf16"
    assert (
        "bf16 is off, but the accelerate config this run was launched with sets mixed_precision: bf16" in caplog.text
    )


def test_missing_context_column_fails_before_training(tmp_path, tokenizer, tiny_model_dir):
    with pytest.raises(ValueError, match="'privileged_context'"):
        SDPGTrainer(
            model=tiny_model_dir, reward_funcs=parity_reward, args=make_args(tmp_path),
            train_dataset=make_dataset().remove_columns("privileged_context"), processing_class=tokenizer,
        )  # fmt: skip
    with pytest.raises(ValueError, match="'hint'"):
        make_trainer(tmp_path, tiny_model_dir, tokenizer, context_column="hint")
    rows = make_dataset().to_list()
    rows[2]["privileged_context"] = " "
    with pytest.raises(ValueError, match="row 2 has no privileged context in column 'privileged_context'"):
        SDPGTrainer(
            model=tiny_model_dir, reward_funcs=parity_reward, args=make_args(tmp_path),
            train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"teacher_template": "no placeholder"}, "teacher_template"),
        ({"teacher_template": "{context} and {answer}"}, "teacher_template"),
        ({"teacher_template": "{context"}, "teacher_template"),
        ({"kl_estimator": "js"}, "kl_estimator"),
        ({"distill_coef": -1e-3}, "distill_coef"),
        ({"beta": -0.1}, "beta"),
        ({"distill_warmup_steps": -1}, "distill_warmup_steps"),
        ({"distill_chunk_size": 0}, "distill_chunk_size"),
        ({"loss_type": "ppo"}, "loss_type"),
        ({"importance_sampling_level": "batch"}, "importance_sampling_level"),
        ({"dual_clip": 0.5}, "dual_clip"),
        # The dual clip floors PPO's clipped ratio, which sapo does not have (SDPG's default gives way; a set one not).
        ({"loss_type": "sapo", "dual_clip": 3.0}, "dual_clip"),
        ({"top_entropy_quantile": 1.5}, "top_entropy_quantile"),
        # With anchor_ratio_weighted set too: the anchor would be weighed twice.
        ({"use_bias_correction_kl": True, "anchor_ratio_weighted": True}, "use_bias_correction_kl"),
        ({"on_policy_surrogate": "clipped"}, "on_policy_surrogate"),
    ],
)
def test_bad_config_names_the_field(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=rf"SDPGConfig\.{field}"):
        make_args(tmp_path, **overrides)


def tiny_llava_config(tokenizer) -> LlavaConfig:
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=8, patch_size=4, projection_dim=16)  # fmt: skip
    return LlavaConfig(text_config=text, vision_config=vision, image_token_index=tokenizer.unk_token_id)


def test_vision_language_signs(tokenizer):
    assert vision_language_signs(tokenizer, LlamaConfig()) == []
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 8}, crop_size=8),
                               tokenizer=tokenizer, patch_size=4)  # fmt: skip
    assert vision_language_signs(processor, LlamaConfig()) == [
        "its processing class LlavaProcessor has an image processor"
    ]
    assert vision_language_signs(tokenizer, tiny_llava_config(tokenizer)) == [
        "its config LlavaConfig has a vision_config"
    ]


@pytest.mark.parametrize("method", ["sdpg_urkl", "grpo"])
def test_vision_language_models_are_refused(tmp_path, tokenizer, method):
    """SDPG's student forward passes no image inputs, so a VLM is refused with the teacher off too."""
    model = LlavaForConditionalGeneration(tiny_llava_config(tokenizer))
    with pytest.raises(NotImplementedError, match="vision-language model .*vision_config.* would be dropped") as err:
        SDPGTrainer(model=model, reward_funcs=parity_reward, train_dataset=make_dataset(), processing_class=tokenizer,
                    args=make_args(tmp_path, method=method, beta=0.0))  # fmt: skip
    assert ("teacher prompts would be tokenised without their images" in str(err.value)) is (method != "grpo")


def test_a_vision_language_model_or_an_unsupported_logit_transform_is_refused_before_the_weights_load(
    tmp_path, tokenizer, tiny_model_dir, monkeypatch
):
    # From a model object's config, or a local checkpoint's config.json, before GRPOTrainer loads anything.
    monkeypatch.setattr(GRPOTrainer, "__init__", lambda *a, **k: pytest.fail("GRPOTrainer loaded the model"))
    vlm = LlavaForConditionalGeneration(tiny_llava_config(tokenizer))
    with pytest.raises(NotImplementedError, match="vision-language model"):
        SDPGTrainer(model=vlm, reward_funcs=parity_reward, train_dataset=make_dataset(), processing_class=tokenizer,
                    args=make_args(tmp_path, beta=0.0))  # fmt: skip
    scaled = tmp_path / "scaled"
    shutil.copytree(tiny_model_dir, scaled)
    config = json.loads((scaled / "config.json").read_text())
    (scaled / "config.json").write_text(json.dumps({**config, "logits_scaling": 2.0}))
    with pytest.raises(NotImplementedError, match="'logits_scaling'"):
        SDPGTrainer(model=str(scaled), reward_funcs=parity_reward, train_dataset=make_dataset(),
                    processing_class=tokenizer, args=make_args(tmp_path))  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "named"),
    [({"modules_to_save": ["lm_head"]}, "modules_to_save"), ({"bias": "all"}, "bias='all'")],
)
def test_an_ema_teacher_with_peft_that_is_not_pure_lora_is_refused_before_the_model_loads(
    tmp_path, tokenizer, tiny_model_dir, monkeypatch, extra, named
):
    monkeypatch.setattr(GRPOTrainer, "__init__", lambda *a, **k: pytest.fail("GRPOTrainer loaded the model"))
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **extra)
    with pytest.raises(ValueError, match=rf"teacher_model_kind='ema' with PEFT needs pure LoRA.*trains {named}"):
        SDPGTrainer(model=tiny_model_dir, reward_funcs=parity_reward, train_dataset=make_dataset(),
                    processing_class=tokenizer, peft_config=peft_config,
                    args=make_args(tmp_path, teacher_model_kind="ema"))  # fmt: skip


def test_use_liger_kernel_applies_liger_layer_kernels_as_in_grpo(tmp_path, tokenizer, tiny_model_dir, monkeypatch):
    """`use_liger_kernel` is not ignored: as in TRL's GRPOTrainer, train() patches the policy's layers with Liger's
    kernels, with Liger's fused linear cross-entropy off (it would replace the LM-head pass SDPG computes itself).
    Liger needs a GPU and is not installed here, so the call is recorded, not run."""
    applied = []
    monkeypatch.setattr("transformers.trainer.apply_liger_kernel", lambda model, cfg: applied.append((model, cfg)))
    monkeypatch.setattr("sdpg_trl.config.is_installed", lambda module: True)  # SDPGTrainer checks Liger is installed
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, use_liger_kernel=True, max_steps=1)
    trainer.train()
    assert applied == [(trainer.model, {"fused_linear_cross_entropy": False})]
    with pytest.raises(ValueError, match="fused_linear_cross_entropy"):  # GRPOTrainer's refusal, inherited
        make_trainer(tmp_path, tiny_model_dir, tokenizer, use_liger_kernel=True,
                     liger_kernel_config={"fused_linear_cross_entropy": True})  # fmt: skip


def test_plain_grpo_config_is_rejected(tmp_path, tokenizer, tiny_model_dir):
    with pytest.raises(TypeError, match="SDPGConfig"):
        SDPGTrainer(
            model=tiny_model_dir, reward_funcs=parity_reward,
            args=GRPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True),
            train_dataset=make_dataset(), processing_class=tokenizer,
        )  # fmt: skip


def test_paper_defaults():
    args = SDPGConfig(output_dir="unused", bf16=False, use_cpu=True)
    assert (args.distill_coef, args.beta, args.distill_warmup_steps, args.distill_decay_steps) == (1e-3, 1e-3, 50, 350)
    assert args.kl_estimator == "urkl" and args.distill_positive_only and args.loss_type == "dapo"
    assert "{context}" in args.teacher_template


def test_model_card_cites_sdpg_not_grpo(tmp_path, tokenizer, tiny_model_dir):
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer)
    trainer.create_model_card(model_name="tiny-sdpg")
    card = (tmp_path / "README.md").read_text()
    assert "2606.04036" in card and "Self-Distilled Policy Gradient" in card and "liu2026self" in card
    assert "2402.03300" not in card and "DeepSeekMath" not in card


def test_trainer_signature_names_grpo_arguments():
    import inspect

    params = inspect.signature(SDPGTrainer.__init__).parameters
    for name in ("model", "reward_funcs", "args", "train_dataset", "eval_dataset", "processing_class",
                 "reward_processing_classes", "callbacks", "optimizers", "peft_config"):  # fmt: skip
        assert name in params, name
