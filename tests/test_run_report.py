"""The run says what it did (issue 16, section 3): a warning when the distillation schedule never reaches
`distill_coef`, and the run's curves as PNG files in `output_dir` at the end of training."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from test_trainer import make_trainer

from sdpg_trl import SDPGConfig
from sdpg_trl.losses import distill_coef_schedule
from sdpg_trl.plotting import CURVES, plot_curves
from sdpg_trl.run_report import distill_peak

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("max_steps", "warmup", "decay"),
    [(2, 50, 350), (400, 50, 350), (399, 50, 350), (100, 0, 350), (100, 50, 0), (7, 3, 5), (1, 0, 0), (30, 40, 10)],
)
def test_distill_peak_is_the_schedules_maximum(tmp_path, max_steps, warmup, decay):
    args = SDPGConfig(
        output_dir=str(tmp_path), distill_warmup_steps=warmup, distill_decay_steps=decay, bf16=False, use_cpu=True
    )
    values = [distill_coef_schedule(k, max_steps, args.distill_coef, warmup, decay) for k in range(max_steps)]
    peak, step = distill_peak(args, max_steps)
    assert peak == max(values) and step == values.index(max(values))


def test_a_run_too_short_for_the_schedule_warns_with_its_peak(tmp_path, tokenizer, tiny_model_dir, caplog):
    # The paper's windows (warmup 50, decay 350) on a 2-step run: beta(1) = 1e-3 * 1/50 * 1/350 = 5.7e-8.
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, distill_coef=1e-3, distill_warmup_steps=50,
                           distill_decay_steps=350)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="sdpg_trl.run_report"):
        trainer.train()
    (record,) = [r for r in caplog.records if r.name == "sdpg_trl.run_report"]
    assert record.getMessage() == (
        "The distillation weight beta(k) never reaches distill_coef=0.001 in this run: with max_steps=2, "
        "distill_warmup_steps=50 and distill_decay_steps=350 the warmup and the decay overlap, and beta(k) peaks at "
        "5.71e-08 (5.71e-05 of distill_coef) at optimiser step 2 of 2. To distil at distill_coef, train for at least "
        "distill_warmup_steps + distill_decay_steps = 400 steps, or shorten the two windows (0 turns one off)."
    )
    assert max(h["sdpg/distill_coef"] for h in trainer.state.log_history if "sdpg/distill_coef" in h) == (
        pytest.approx(5.71e-8, rel=1e-2)
    )


@pytest.mark.parametrize("settings", [dict(distill_warmup_steps=1, distill_decay_steps=1), dict(method="grpo")])
def test_no_warning_when_the_schedule_peaks_or_nothing_is_distilled(tmp_path, tokenizer, tiny_model_dir, caplog,
                                                                    settings):  # fmt: skip
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, **settings)
    with caplog.at_level(logging.WARNING, logger="sdpg_trl.run_report"):
        trainer.train()
    assert not [r for r in caplog.records if r.name == "sdpg_trl.run_report"]


def test_a_run_writes_its_curves_as_png_files(tmp_path, tokenizer, tiny_model_dir, caplog):
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer)
    with caplog.at_level(logging.INFO, logger="sdpg_trl.plotting"):
        trainer.train()
    # Logged in a 2-step run without evaluation: reward, entropy, both KLs, lengths (no held-out accuracy).
    names = {"reward", "entropy", "kl", "response_length"}
    assert {p.stem for p in tmp_path.glob("*.png")} == names
    for name in names:
        data = (tmp_path / f"{name}.png").read_bytes()
        assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and data.endswith(b"IEND\xaeB`\x82"), name
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "reward.png").shape[:2] == (350, 600)  # decodes: 6 x 3.5 in at 100 dpi
    assert "Curves written to" in caplog.text


def test_accuracy_curve_draws_every_held_out_set(tmp_path):
    history = [
        {"step": 1, "eval_aime24_accuracy": 0.1, "eval_amc23_accuracy": 0.2},
        {"step": 2, "eval_aime24_accuracy": 0.3, "eval_amc23_accuracy": 0.4, "reward": 0.5},
    ]
    assert {p.name for p in plot_curves(history, tmp_path)} == {"accuracy.png", "reward.png"}
    assert set(CURVES) == {"reward", "accuracy", "entropy", "kl", "response_length"}


def test_without_matplotlib_the_run_says_how_to_get_the_curves(tmp_path, tiny_model_dir):
    # matplotlib is made unimportable in a subprocess; the run trains, writes no PNG, and logs one line.
    code = f"""
import logging, sys
sys.path.insert(0, {str(ROOT / "tests")!r})
class NoMatplotlib:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib' (blocked by the test)")
sys.meta_path.insert(0, NoMatplotlib())
logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
from conftest import make_tokenizer
from test_trainer import make_trainer
make_trainer({str(tmp_path)!r}, {tiny_model_dir!r}, make_tokenizer(), distill_warmup_steps=0).train()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("sdpg_trl.plotting:")]
    assert lines == [
        f"sdpg_trl.plotting: No PNG curves written to {tmp_path}: drawing them needs matplotlib (pip install "
        "'sdpg-trl[plots]'); the numbers are in the trainer's state.log_history."
    ]
    assert not list(tmp_path.glob("*.png"))
