"""`sdpg-train` end to end on the tiny model: parsing, data, rewards, in-training mean@k, saving."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset
from test_multiprocess import free_port

from sdpg_trl.scripts.train import main


def _argv(model_dir: str, output_dir: str, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", model_dir,
        "--output_dir", output_dir,
        "--dataset_name", "arithmetic",
        "--arithmetic_num_train", "8",
        "--arithmetic_num_eval", "2",
        "--reward_funcs", "lenient_math_accuracy_reward",
        "--max_steps", "2",
        "--per_device_train_batch_size", "4",
        "--num_generations", "4",
        "--max_completion_length", "6",
        "--distill_coef", "0.1",
        "--distill_warmup_steps", "0",
        "--distill_decay_steps", "0",
        "--logging_steps", "1",
        "--report_to", "none",
        "--save_strategy", "no",
        "--use_cpu", "true",
        *extra,
    ]  # fmt: skip


def _state(output_dir) -> dict:
    return json.loads((output_dir / "trainer_state.json").read_text())


def test_train_script_runs_sdpg_with_in_training_eval(tiny_model_dir, tmp_path):
    eval_flags = ["--eval_every_steps", "1", "--eval_k", "2", "--eval_max_new_tokens", "3"]
    eval_flags += ["--eval_reward_func", "lenient_math_accuracy_reward"]
    assert main(_argv(tiny_model_dir, str(tmp_path), *eval_flags)) is None

    state = _state(tmp_path)
    history = state["log_history"]
    assert state["global_step"] == 2
    # Evaluations at steps 0 (before training), 1 and 2, each a real accuracy in [0, 1].
    evals = [entry for entry in history if "eval_accuracy" in entry]
    assert [entry["step"] for entry in evals] == [0, 1, 2]
    assert all(0.0 <= entry["eval_accuracy"] <= 1.0 for entry in evals)
    assert all(entry["eval_completion_length"] <= 3 for entry in evals)
    # Training metrics stay in their own entries: the eval logging did not swallow them.
    train_entries = [entry for entry in history if "loss" in entry]
    assert len(train_entries) == 2
    assert all("rewards/lenient_math_accuracy_reward/mean" in entry for entry in train_entries)
    assert (tmp_path / "model.safetensors").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 2


def test_train_script_trains_on_a_data_set_in_sdpg_form_and_logs_each_eval_set(tiny_model_dir, tmp_path):
    """A Hub data set already in SDPG form (a local folder laid out as a Hub repository), TRL's column names (the
    gold answer in `solution`), the context renamed into place, and two named eval sets."""
    folder = tmp_path / "my-org" / "sdpg-set"
    (folder / "data").mkdir(parents=True)
    rows = [{"prompt": [{"role": "user", "content": f"what is {i} plus 1 ?"}], "hint": f"it is {i + 1}",
             "solution": str(i + 1)} for i in range(6)]  # fmt: skip
    Dataset.from_list(rows[:4]).to_parquet(folder / "data" / "train-00000-of-00001.parquet")
    Dataset.from_list(rows[4:]).to_parquet(folder / "data" / "test-00000-of-00001.parquet")
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"prompt": "what is 2 plus 2 ?", "answer": "4"}) + "\n")
    main(_argv(tiny_model_dir, str(tmp_path / "out"), "--dataset_name", str(folder), "--max_steps", "1",
               "--dataset_column_mapping", '{"hint": "privileged_context"}', "--eval_every_steps", "1",
               "--eval_before_training", "false", "--eval_dataset_name", str(folder), str(extra), "--eval_k", "1",
               "--eval_max_new_tokens", "2", "--eval_reward_func", "lenient_math_accuracy_reward"))  # fmt: skip

    history = _state(tmp_path / "out")["log_history"]
    [evals] = [entry for entry in history if any(key.startswith("eval_") for key in entry)]
    assert evals["step"] == 1 and {key for key in evals if key.startswith("eval_")} == {
        "eval_sdpg-set_accuracy", "eval_sdpg-set_completion_length", "eval_extra_accuracy",
        "eval_extra_completion_length",
    }  # fmt: skip
    [train] = [entry for entry in history if "loss" in entry]
    assert "rewards/lenient_math_accuracy_reward/mean" in train and "sdpg/distill_coef" in train


def test_train_script_applies_lora_from_model_config(tiny_model_dir, tmp_path):
    main(_argv(tiny_model_dir, str(tmp_path), "--max_steps", "1", "--use_peft", "true", "--lora_r", "4",
               "--lora_target_modules", "q_proj", "v_proj"))  # fmt: skip

    assert _state(tmp_path)["global_step"] == 1
    assert (tmp_path / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--reward_funcs", "no_such_reward"), "no_such_reward"),
        (("--dataset_name", "missing.parquet", "--dataset_source", "aime24"), "missing.parquet"),
        (("--arithmetic_level", "9"), "level"),
        (("--eval_reward_func", "nope"), "nope"),
        (("--dataset_name", "{no_context}"), r"no_context\.jsonl \(split 'train'\) has no privileged-context column"),
    ],
)
def test_train_script_rejects_bad_input_before_loading_the_model(tmp_path, extra, message):
    no_context = tmp_path / "no_context.jsonl"
    no_context.write_text(json.dumps({"prompt": "What is 1 + 1?", "answer": "2"}) + "\n")
    extra = [arg.format(no_context=no_context) for arg in extra]
    # The model path does not exist: each error must come from the inputs, before any model loading.
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        main(_argv(str(tmp_path / "no-model"), str(tmp_path), *extra))


def test_a_method_without_a_teacher_needs_no_context_column(tmp_path):
    data = tmp_path / "no_context.jsonl"
    data.write_text(json.dumps({"prompt": "What is 1 + 1?", "answer": "2"}) + "\n")
    # The data passes; what fails is the model, which does not exist.
    with pytest.raises(OSError, match="no-model"):
        main(_argv(str(tmp_path / "no-model"), str(tmp_path), "--dataset_name", str(data), "--distill_coef", "0"))


def test_train_script_needs_a_held_out_set_for_in_training_eval(tmp_path):
    data = tmp_path / "aime.json"
    data.write_text(json.dumps([{"problem": "What is 1 + 1?", "answer": "2"}]))
    extra = ("--dataset_name", str(data), "--dataset_source", "aime24", "--eval_every_steps", "1")
    with pytest.raises(ValueError, match="held-out set"):
        main(_argv(str(tmp_path / "no-model"), str(tmp_path), *extra))


def test_accelerate_launch_runs_the_module_with_a_recipe(tiny_model_dir, tmp_path):
    """The documented `accelerate launch ... -m sdpg_trl.scripts.train --config recipes/...` path, on 2 CPU processes
    (DDP over gloo), with the mean@k evaluation split over both processes."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "demo_cpu.yaml"
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
        "--dynamo_backend", "no",
    ]  # fmt: skip
    overrides = _argv(tiny_model_dir, str(tmp_path), "--eval_every_steps", "1", "--eval_k", "1",
                      "--eval_max_new_tokens", "3", "--arithmetic_num_eval", "3")  # fmt: skip
    cmd = [*launch, "-m", "sdpg_trl.scripts.train", "--config", str(recipe), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    # Main-process log lines: evaluations at steps 0, 1 and 2, then the training summary; the model is saved.
    assert result.stdout.count("'eval_accuracy'") == 3, result.stdout[-2000:]
    assert "train_runtime" in result.stdout
    assert (tmp_path / "model.safetensors").is_file()
