"""The demo's pipeline on the tiny model (standing in for the converted SmolLM2): outputs, plots, summary."""

from __future__ import annotations

import csv
import json
import shutil
import types

import pytest

from sdpg_trl.data import arithmetic_dataset
from sdpg_trl.evaluation import evaluate_prompt_views
from sdpg_trl.models import CACHE_ENV
from sdpg_trl.plotting import CURVES
from sdpg_trl.scripts import demo
from sdpg_trl.scripts.demo import main
from sdpg_trl.teacher import build_teacher_prompt


@pytest.fixture
def cached_tiny_smollm2(tiny_model_dir, tmp_path, monkeypatch):
    """A cache in which the 'converted SmolLM2' is the tiny model, so the demo skips the GGUF conversion."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    shutil.copytree(tiny_model_dir, tmp_path / "cache" / "smollm2-135m-instruct")
    return tmp_path / "cache" / "smollm2-135m-instruct"


def test_demo_writes_metrics_plots_and_a_summary(cached_tiny_smollm2, tmp_path, capsys, monkeypatch):
    events = []

    def spy(real, event):
        def wrapper(*args, **kwargs):
            events.append((event, args))
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(demo, "evaluate_prompt_views", spy(demo.evaluate_prompt_views, "headroom"))
    monkeypatch.setattr(demo, "train", spy(demo.train, "train"))
    out = tmp_path / "demo"
    summary = main([
        "--output_dir", str(out),
        "--max_steps", "2", "--eval_every_steps", "1", "--eval_k", "1", "--eval_max_new_tokens", "3",
        "--arithmetic_num_train", "8", "--arithmetic_num_eval", "2",
        "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "4",
    ])  # fmt: skip

    history = json.loads((out / "metrics.json").read_text())
    evals = [entry for entry in history if "eval_accuracy" in entry]
    assert [entry["step"] for entry in evals] == [0, 1, 2]
    assert summary["accuracy_before"] == evals[0]["eval_accuracy"]
    assert summary["accuracy_after"] == evals[-1]["eval_accuracy"]
    assert summary["steps"] == 2 and summary["wall_time_s"] > 0
    assert json.loads((out / "summary.json").read_text()) == summary
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(history) and "sdpg/distill_kl" in rows[0]
    for name in CURVES:
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "before" in capsys.readouterr().out

    # The teacher headroom: measured before training, on the training split (all 8 problems: fewer than 24).
    assert [event for event, _ in events] == ["headroom", "train"]
    problems = events[0][1][1]
    data = arithmetic_dataset(num_train=8, num_test=2, level=1)
    assert problems["prompt"] == data["train"]["prompt"]
    assert not set(map(str, problems["prompt"])) & set(map(str, data["test"]["prompt"]))
    headroom = summary["teacher_headroom"]
    assert (headroom["split"], headroom["num_problems"], headroom["k"], headroom["samples"]) == ("train", 8, 1, 8)
    assert headroom["context_column"] == "privileged_context" and "{context}" in headroom["teacher_template"]
    for key in ("student_accuracy", "teacher_accuracy", "ratio", "difference", "student_se", "teacher_se"):
        assert key in headroom
    assert summary["teacher_headroom_s"] > 0


def test_demo_headroom_can_be_skipped_and_takes_the_first_training_problems(
    cached_tiny_smollm2, tmp_path, monkeypatch
):
    history = [{"step": 0, "eval_accuracy": 0.1}, {"step": 2, "eval_accuracy": 0.2}]
    fake_trainer = types.SimpleNamespace(state=types.SimpleNamespace(log_history=history, global_step=2))
    monkeypatch.setattr(demo, "train", lambda *args: fake_trainer)
    calls = []
    monkeypatch.setattr(demo, "evaluate_prompt_views", lambda *args, **kwargs: calls.append(args))
    argv = ["--output_dir", str(tmp_path / "demo"), "--max_steps", "2", "--eval_every_steps", "1"]
    summary = main([*argv, "--headroom_problems", "0"])
    assert calls == [] and summary["teacher_headroom"] is None

    seen = []

    def evaluate(model, tokenizer, data, k, chat_template_kwargs, **kwargs):  # student 1 in 4 right, teacher 1 in 2
        seen.append((data["prompt"], k, chat_template_kwargs))
        teacher = "Hint: " in data["prompt"][0][0]["content"]
        return {"accuracy": 0.5 if teacher else 0.25, "num_problems": len(data), "k": k}

    monkeypatch.setattr(demo, "evaluate_prompt_views", evaluate_prompt_views)
    monkeypatch.setattr(demo, "evaluate_mean_at_k", evaluate)
    summary = main([*argv, "--headroom_problems", "3", "--teacher_template", "Hint: {context}", "--eval_k", "4",
                    "--chat_template_kwargs", '{"enable_thinking": false}'])  # fmt: skip
    rows = arithmetic_dataset(256, 48, 1)["train"].select(range(3))  # the recipe's training split, first 3
    teacher = [build_teacher_prompt(r["prompt"], r["privileged_context"], "Hint: {context}", "c") for r in rows]
    thinking_off = {"enable_thinking": False}  # the recipe's chat template settings, as in training
    assert seen == [(rows["prompt"], 4, thinking_off), (teacher, 4, thinking_off)]
    headroom = summary["teacher_headroom"]
    assert (headroom["num_problems"], headroom["samples"], headroom["split"]) == (3, 12, "train")
    assert headroom["ratio"] == 2.0 and headroom["teacher_template"] == "Hint: {context}"
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["teacher_headroom"] == headroom
    with pytest.raises(ValueError, match="--headroom_problems must be >= 0"):
        main([*argv, "--headroom_problems", "-1"])


def test_demo_refuses_a_run_whose_last_step_is_not_evaluated(cached_tiny_smollm2, tmp_path):
    with pytest.raises(ValueError, match="multiple of eval_every_steps"):
        main(["--output_dir", str(tmp_path / "demo"), "--max_steps", "3", "--eval_every_steps", "2"])
