"""Resume inside a generation cycle (issue 10, section 3): such checkpoints are refused; at a cycle's end, exact."""

from __future__ import annotations

import logging

import pytest
from test_trainer import make_args, make_trainer


@pytest.mark.parametrize(
    ("windows", "cycle"),
    [
        ({"steps_per_generation": 2}, 2),
        ({"num_iterations": 3}, 3),
        ({"steps_per_generation": 4, "gradient_accumulation_steps": 2}, 2),
        ({"steps_per_generation": 3, "gradient_accumulation_steps": 2}, 3),  # cycles end at micro-batch 6, step 3
        ({"steps_per_generation": 2, "gradient_accumulation_steps": 4}, 1),
    ],
)
def test_save_steps_must_be_a_multiple_of_the_generation_cycle(tmp_path, windows, cycle):
    assert make_args(tmp_path, **windows).generation_cycle_steps == cycle
    assert make_args(tmp_path, save_strategy="steps", save_steps=2 * cycle, **windows).save_steps == 2 * cycle
    if cycle > 1:
        with pytest.raises(ValueError, match=rf"SDPGConfig\.save_steps \({cycle + 1}\) must be a multiple of the "
                                             rf"generation cycle, {cycle} optimizer steps"):  # fmt: skip
            make_args(tmp_path, save_strategy="steps", save_steps=cycle + 1, **windows)


def test_no_checkpoint_inside_a_cycle_and_exact_resume_at_its_end(tmp_path, tokenizer, tiny_model_dir, caplog):
    """Cycles of 2 steps, 3 steps: checkpoint-2 is written; the final save at step 3 is refused. Resuming from
    checkpoint-2 gives step 3 the uninterrupted run's loss."""
    overrides = dict(max_steps=3, steps_per_generation=2, save_strategy="steps", save_steps=2)
    with caplog.at_level(logging.WARNING, logger="sdpg_trl.checkpoints"):
        full = make_trainer(tmp_path, tiny_model_dir, tokenizer, **overrides)
        full.train()
    assert (tmp_path / "checkpoint-2").is_dir() and not (tmp_path / "checkpoint-3").exists()
    assert (
        "did not save a checkpoint at step 3: it falls inside a generation cycle of 2 optimizer steps" in caplog.text
    )
    losses = {h["step"]: h["loss"] for h in full.state.log_history if "loss" in h}

    resumed = make_trainer(tmp_path, tiny_model_dir, tokenizer, **overrides)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    (step3,) = [h["loss"] for h in resumed.state.log_history if "loss" in h and h["step"] == 3]
    assert step3 == pytest.approx(losses[3], rel=1e-6)
