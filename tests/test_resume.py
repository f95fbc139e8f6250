"""Resume is exact for every teacher kind, picks a complete checkpoint, and refuses other loss settings (issue 16,
section 5)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from conftest import make_model
from peft import get_peft_model
from test_trainer import LORA, make_args, make_trainer

from sdpg_trl import _trl_compat
from sdpg_trl.checkpoints import (
    SETTINGS_NAME,
    TRAINER_STATE_NAME,
    check_resumable,
    loss_settings,
    write_settings,
)
from sdpg_trl.teachers import EMA_ADAPTER_NAME, EMA_TEACHER_NAME

# Every rollout is distilled (no gate), so the teacher's weights reach the loss at every step; a checkpoint at step 1
# of 2 (a generation cycle is 1 step here).
RUN = dict(max_steps=2, save_strategy="steps", save_steps=1, distill_positive_only=False)
TEACHERS = {
    "live": dict(teacher_model_kind="live"),
    "base-reference": dict(teacher_model_kind="base"),  # beta > 0: the reference model
    "base-copy": dict(teacher_model_kind="base", beta=0.0),  # a frozen copy of the initial weights
    "ema": dict(teacher_model_kind="ema", teacher_update_rate=0.5),
}


def weights(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def interrupted_and_resumed(tmp_path, tokenizer, model, peft_config=None, **settings):
    """The uninterrupted 2-step run, and a new trainer resumed from its step-1 checkpoint."""
    full = make_trainer(tmp_path / "full", model, tokenizer, peft_config=peft_config, **RUN, **settings)
    full.train()
    resumed = make_trainer(tmp_path / "resumed", model, tokenizer, peft_config=peft_config, **RUN, **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-1"))
    return full, resumed


@pytest.mark.parametrize("teacher", list(TEACHERS))
def test_resumed_run_ends_with_the_uninterrupted_runs_weights(tmp_path, tokenizer, tiny_model_dir, teacher):
    full, resumed = interrupted_and_resumed(tmp_path, tokenizer, tiny_model_dir, **TEACHERS[teacher])
    assert resumed.state.global_step == full.state.global_step == 2
    expected = weights(full)
    for name, value in weights(resumed).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-7, msg=name)
    if teacher == "ema":
        assert (tmp_path / "full" / "checkpoint-1" / EMA_TEACHER_NAME).is_file()
        teachers = [dict(t.teacher.model.named_parameters()) for t in (full, resumed)]
        for name, value in teachers[1].items():
            torch.testing.assert_close(value, teachers[0][name], rtol=0, atol=1e-7, msg=name)


def test_lora_ema_teacher_resumes_from_its_saved_adapter(tmp_path, tokenizer, tiny_model_dir):
    """PEFT saves the `sdpg_ema_teacher` adapter with the policy's; transformers loads it back on resume, and the EMA
    callback continues from it instead of adding a second adapter of that name (which PEFT refuses)."""
    full, resumed = interrupted_and_resumed(
        tmp_path, tokenizer, tiny_model_dir, peft_config=LORA, **TEACHERS["ema"], learning_rate=0.1
    )
    assert (tmp_path / "full" / "checkpoint-1" / EMA_ADAPTER_NAME / "adapter_model.safetensors").is_file()
    expected = weights(full)
    assert any(EMA_ADAPTER_NAME in name for name in expected)
    for name, value in weights(resumed).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-7, msg=name)
    shadows = [t.teacher.callback.shadow_weights for t in (full, resumed)]
    assert shadows[0].keys() == shadows[1].keys() and any(v.abs().sum() > 0 for v in shadows[0].values())
    for name, value in shadows[1].items():
        torch.testing.assert_close(value, shadows[0][name], rtol=0, atol=1e-7, msg=name)


def test_trl_ema_adapter_callback_keeps_the_state_resume_restores(tokenizer):
    # The resume writes these attributes of TRL's callback (trl.experimental.sdpo); fail here if TRL renames them.
    model = get_peft_model(make_model(tokenizer), LORA)
    callback = _trl_compat.PEFTAdapterEMACallback(model, teacher_adapter_name=EMA_ADAPTER_NAME)
    assert {"shadow_weights", "teacher_adapter_config", "_initialized"} <= set(vars(callback))
    callback._initialize_teacher_adapter()
    assert callback._initialized and EMA_ADAPTER_NAME in model.peft_config


def test_resume_true_skips_a_partially_written_checkpoint(tmp_path, tokenizer, tiny_model_dir, caplog):
    full = make_trainer(tmp_path, tiny_model_dir, tokenizer, **RUN)
    full.train()
    # A run killed while writing checkpoint-3: the folder exists, its last file (trainer_state.json) does not.
    partial = tmp_path / "checkpoint-3"
    shutil.copytree(tmp_path / "checkpoint-2", partial)
    (partial / "trainer_state.json").unlink()
    resumed = make_trainer(tmp_path, tiny_model_dir, tokenizer, **{**RUN, "max_steps": 3})
    with pytest.raises(ValueError, match=rf"Cannot resume from {partial}: it has no readable trainer_state.json"):
        resumed.train(resume_from_checkpoint=str(partial))  # named explicitly: refused, naming it
    with caplog.at_level(logging.WARNING, logger="sdpg_trl.checkpoints"):
        resumed.train(resume_from_checkpoint=True)
    assert f"Not resuming from {partial}: it has no readable trainer_state.json" in caplog.text
    assert resumed.state.global_step == 3
    assert [h["step"] for h in resumed.state.log_history if "loss" in h] == [1, 2, 3]  # continued from step 2


def test_resume_true_without_a_complete_checkpoint_names_the_output_dir(tmp_path, tokenizer, tiny_model_dir):
    (tmp_path / "checkpoint-1").mkdir()
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, **RUN)
    with pytest.raises(ValueError, match=rf"output_dir \({tmp_path}\) has no completely written checkpoint"):
        trainer.train(resume_from_checkpoint=True)


@pytest.mark.parametrize(
    ("changed", "message"),
    [
        (dict(method="grpo"), r"kl_estimator: 'urkl' -> 'k3'; (.*; )?method: 'sdpg_urkl' -> 'grpo'"),
        (dict(distill_coef=0.25), r"distill_coef: 0.5 -> 0.25"),
        (dict(loss_type="grpo"), r"loss_type: 'dapo' -> 'grpo'"),
    ],
)
def test_resume_with_other_loss_settings_is_refused_naming_them(tmp_path, tokenizer, tiny_model_dir, changed, message):
    full = make_trainer(tmp_path, tiny_model_dir, tokenizer, **{**RUN, "max_steps": 1})
    full.train()
    checkpoint = tmp_path / "checkpoint-1"
    saved = json.loads((checkpoint / SETTINGS_NAME).read_text())
    assert saved == loss_settings(full.args) and saved["method"] == "sdpg_urkl"
    other = make_trainer(tmp_path, tiny_model_dir, tokenizer, **{**RUN, "max_steps": 2, **changed})
    with pytest.raises(ValueError, match=rf"Cannot resume from {checkpoint} with other settings.*{message}"):
        other.train(resume_from_checkpoint=str(checkpoint))
    # Settings that do not change the objective may differ (here: the KL chunk size and the logging of term norms).
    same = make_trainer(tmp_path, tiny_model_dir, tokenizer, **RUN, distill_chunk_size=7, log_term_grad_norms=True)
    same.train(resume_from_checkpoint=str(checkpoint))
    assert same.state.global_step == 2


@pytest.mark.parametrize(
    ("changed", "message"),
    [
        (dict(loss_type="sapo", dual_clip=None, sapo_temperature_pos=2.0), r"sapo_temperature_pos: 1.0 -> 2.0"),
        (dict(loss_type="sapo", dual_clip=None, sapo_temperature_neg=2.0), r"sapo_temperature_neg: 1.05 -> 2.0"),
        (dict(loss_type="vespo", dual_clip=None, vespo_k_pos=1.0), r"vespo_k_pos: 2.0 -> 1.0"),
        (dict(loss_type="vespo", dual_clip=None, vespo_lambda_neg=1.0), r"vespo_lambda_neg: 2.0 -> 1.0"),
        (dict(loss_type="dr_grpo", max_completion_length=5), r"max_completion_length: 6 -> 5"),
    ],
)
def test_resume_refuses_a_change_of_a_field_a_registered_loss_type_reads(tmp_path, changed, message):
    """The resume check's loss fields come from the registries: the fields SAPO, VESPO and Dr. GRPO read (which the
    hand-kept list left out) are compared too."""
    loss_type = {"loss_type": changed["loss_type"], "dual_clip": changed.get("dual_clip", 3.0)}
    (tmp_path / TRAINER_STATE_NAME).write_text("{}")
    write_settings(str(tmp_path), make_args(tmp_path, **loss_type))
    check_resumable(str(tmp_path), make_args(tmp_path, **loss_type))  # the same settings resume
    with pytest.raises(ValueError, match=rf"with other settings than it was trained with.*{message}"):
        check_resumable(str(tmp_path), make_args(tmp_path, **changed))


def test_the_lora_ema_teacher_adapter_is_created_without_drawing_from_the_global_generator(tokenizer):
    # So that an `ema` run's rollouts are a `live` run's on the same seed: teacher kinds compare on the same data.
    model = get_peft_model(make_model(tokenizer), LORA)
    callback = _trl_compat.PEFTAdapterEMACallback(model, teacher_adapter_name=EMA_ADAPTER_NAME)
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    callback._initialize_teacher_adapter()
    assert torch.equal(torch.rand(4), expected)
    teacher = {k: v for k, v in model.state_dict().items() if EMA_ADAPTER_NAME in k}
    assert teacher and all(not v.any() for v in teacher.values())  # TRL's zero adapter, as before


def test_lora_ema_and_live_teachers_train_on_the_same_first_rollouts(tmp_path, tokenizer, tiny_model_dir):
    rollouts = {}
    for kind in ("live", "ema"):
        trainer = make_trainer(tmp_path / kind, tiny_model_dir, tokenizer, peft_config=LORA, max_steps=1,
                               teacher_model_kind=kind)  # fmt: skip
        seen = rollouts.setdefault(kind, [])
        original = trainer._generate_and_score_completions
        trainer._generate_and_score_completions = lambda inputs, seen=seen, original=original: (
            seen.append(out := original(inputs)) or out
        )
        trainer.train()
    [live], [ema] = rollouts["live"], rollouts["ema"]
    assert torch.equal(live["completion_ids"], ema["completion_ids"])
