"""The demo's pipeline on the tiny model (standing in for the converted SmolLM2): outputs, plots, summary."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from sdpg_trl.models import CACHE_ENV
from sdpg_trl.scripts.demo import CURVES, main


@pytest.fixture
def cached_tiny_smollm2(tiny_model_dir, tmp_path, monkeypatch):
    """A cache in which the 'converted SmolLM2' is the tiny model, so the demo skips the GGUF conversion."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    shutil.copytree(tiny_model_dir, tmp_path / "cache" / "smollm2-135m-instruct")
    return tmp_path / "cache" / "smollm2-135m-instruct"


def test_demo_writes_metrics_plots_and_a_summary(cached_tiny_smollm2, tmp_path, capsys):
    out = tmp_path / "demo"
    summary = main([
        "--output_dir", str(out),
        "--max_steps", "2", "--eval_every_steps", "1", "--eval_k", "1", "--eval_max_new_tokens", "3",
        "--arithmetic_num_train", "8", "--arithmetic_num_eval", "2",
        "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "4",
    ])  # fmt: skip

    history = json.loads((out / "metrics.json").read_text())
    evals = [entry for entry in history if "eval/accuracy" in entry]
    assert [entry["step"] for entry in evals] == [0, 1, 2]
    assert summary["accuracy_before"] == evals[0]["eval/accuracy"]
    assert summary["accuracy_after"] == evals[-1]["eval/accuracy"]
    assert summary["steps"] == 2 and summary["wall_time_s"] > 0
    assert json.loads((out / "summary.json").read_text()) == summary
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(history) and "sdpg/opd_kl" in rows[0]
    for name in CURVES:
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "before" in capsys.readouterr().out


def test_demo_refuses_a_run_whose_last_step_is_not_evaluated(cached_tiny_smollm2, tmp_path):
    with pytest.raises(ValueError, match="multiple of eval_every_steps"):
        main(["--output_dir", str(tmp_path / "demo"), "--max_steps", "3", "--eval_every_steps", "2"])
