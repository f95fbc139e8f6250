"""SDPG's own metrics (`sdpg/*`, `rlsd/*`) in one process: one value per optimizer step, the ratio of the step's sums
over all its micro-batches, and NaN (left out of the logging window's average) where nothing was measured. The same
over two processes: tests/test_multiprocess.py."""

from __future__ import annotations

import math

import pytest
import torch
from test_trainer import hand_batch, make_trainer

from sdpg_trl.compare import render_diagnostics, summarise_run
from sdpg_trl.plotting import plot_curves

OWN = ("sdpg/", "rlsd/")  # SDPG's metric prefixes; the others are GRPOTrainer's, per micro-batch


def rows(batch: dict, index: list[int]) -> dict:
    """The rollouts `index` of `batch`; `num_items_in_batch` (the step's token count) is kept whole."""
    return {k: v[index] if k != "num_items_in_batch" else v for k, v in batch.items()}


def run_step(trainer, micro_batches: list[dict], mode: str = "train") -> dict[str, list[float]]:
    """`compute_loss` on each micro-batch of one optimizer step, the last one syncing gradients as the Trainer's loop
    marks it; the metrics appended, as lists."""
    trainer.model.train(mode == "train")
    trainer.current_gradient_accumulation_steps = len(micro_batches)
    before = {k: len(v) for k, v in trainer._metrics[mode].items()}
    try:
        for i, batch in enumerate(micro_batches):
            trainer.accelerator.gradient_state._set_sync_gradients(i == len(micro_batches) - 1)
            trainer.compute_loss(trainer.model, batch)
    finally:  # the gradient state is shared by every accelerator of the process
        trainer.accelerator.gradient_state._set_sync_gradients(True)
    return {k: v[before.get(k, 0) :] for k, v in trainer._metrics[mode].items()}


@pytest.fixture
def batch(tokenizer):
    batch = hand_batch(tokenizer)  # advantages 0.9, -0.3, 1.2, -1.8: rollouts 0 and 2 (7 and 4 tokens) distilled
    batch["context_token_mask"] = batch["completion_ids"] % 3 == 0
    return batch


@pytest.mark.parametrize(
    "method, split, bf16",
    [
        ("sdpg_urkl", [[0, 1], [2, 3]], False),
        ("sdpg_urkl", [[1, 3], [0, 2]], False),
        ("sdpg_urkl", [[1], [3], [0, 2]], False),
        ("sdpg_urkl", [[0, 1], [2, 3]], True),
        ("rlsd", [[0, 1], [2, 3]], False),
        ("rlsd", [[1], [3], [0, 2]], False),
    ],
    ids=str,
)
def test_accumulated_step_logs_the_ratio_of_its_sums(tmp_path, tokenizer, tiny_model_dir, batch, method, split, bf16):
    """gradient_accumulation over micro-batches of unequal token counts (in `[1, 3], [0, 2]` the first distils
    nothing) logs what one micro-batch holding them all logs, once per step; also in bf16."""
    trainer = make_trainer(
        tmp_path, tiny_model_dir, tokenizer, method=method, gradient_accumulation_steps=len(split), bf16=bf16
    )
    assert trainer.accelerator.mixed_precision == ("bf16" if bf16 else "no")
    whole = run_step(trainer, [batch])
    accumulated = run_step(trainer, [rows(batch, index) for index in split])
    own = sorted(k for k in whole if k.startswith(OWN))
    assert own == sorted(k for k in accumulated if k.startswith(OWN))
    expected = {"sdpg_urkl": "sdpg/kl_share_on_context_tokens", "rlsd": "rlsd/advantage_weight"}[method]
    assert expected in own
    for key in own:  # what the logging window would average, then: one value per step
        logged = [v for v in accumulated[key] if not math.isnan(v)]
        assert sum(logged) / len(logged) == pytest.approx(whole[key][0], rel=1e-5, abs=1e-7), key
        assert len(whole[key]) == len(accumulated[key]) == 1, key
    assert len(accumulated["entropy"]) == len(split)  # GRPOTrainer's: one per micro-batch


def logged_window(trainer) -> dict:
    """What `trainer.log` writes for the metrics gathered since the last log."""
    trainer.log({})
    return trainer.state.log_history[-1]


def test_a_step_that_distilled_nothing_is_left_out_of_the_logging_window(tmp_path, tokenizer, tiny_model_dir, batch):
    """A step whose rollouts all have advantage <= 0 has no distilled token: its distillation metrics are NaN, left
    out of the logging window's mean, not 0 (which halved `sdpg/student_entropy` against `entropy`)."""
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer)
    undistilled = {**batch, "advantages": -batch["advantages"].abs()}
    alone = run_step(trainer, [batch])
    for _ in range(3):
        nothing = run_step(trainer, [undistilled])
    window = logged_window(trainer)
    for key in ("sdpg/student_entropy", "sdpg/teacher_entropy", "sdpg/distill_kl", "sdpg/kl_share_on_context_tokens"):
        assert window[key] == pytest.approx(alone[key][0], rel=1e-6), key
    assert window["sdpg/gate_ratio"] == pytest.approx(0.5 / 4)  # 0.5, 0, 0, 0: defined at every step
    # The entropy of the distilled tokens is of the order of all tokens' entropy, not a quarter of it.
    assert window["sdpg/student_entropy"] == pytest.approx(window["entropy"], rel=0.5)
    assert math.isnan(nothing["sdpg/student_entropy"][0]) and nothing["sdpg/gate_ratio"] == [0.0]

    run_step(trainer, [undistilled])  # a window that distilled nothing logs None, as GRPOTrainer does
    window = logged_window(trainer)
    assert window["sdpg/student_entropy"] is None and window["sdpg/gate_ratio"] == 0.0
    assert window["entropy"] > 0


def test_eval_logs_each_call(tmp_path, tokenizer, tiny_model_dir, batch):
    """In evaluation there is no accumulation window: each `compute_loss` call is one value."""
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, gradient_accumulation_steps=2)
    trainer.accelerator.gradient_state._set_sync_gradients(False)  # as in the middle of a training window
    trainer.model.eval()
    try:
        with torch.no_grad():
            trainer.compute_loss(trainer.model, batch)
    finally:
        trainer.accelerator.gradient_state._set_sync_gradients(True)
    assert len(trainer._metrics["eval"]["sdpg/distill_kl"]) == 1 and "sdpg/distill_kl" not in trainer._metrics["train"]


def test_report_and_curves_show_a_metric_that_was_never_defined_as_missing(tmp_path):
    """The logged history has None where a window measured nothing: the comparison report shows "—" (not 0.000) for
    a metric a method never measured, and the curves skip the None points."""
    defined = [{"step": s, "sdpg/student_entropy": 2.0, "sdpg/distill_kl": 0.1, "kl": 0.01} for s in (1, 2)]
    undefined = [{"step": s, "sdpg/student_entropy": None, "sdpg/distill_kl": None, "kl": 0.02} for s in (1, 2)]
    mixed = [defined[0], undefined[1]]
    results = {"runs": {"sdpg": {0: summarise_run(mixed, None)}, "never": {0: summarise_run(undefined, None)}}}
    text = render_diagnostics(results)
    assert "| sdpg | 2.000 |" in text and "| never | — |" in text
    pytest.importorskip("matplotlib")
    written = plot_curves(undefined + mixed, tmp_path / "curves")
    assert tmp_path / "curves" / "kl.png" in written
