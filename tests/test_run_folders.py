"""`sdpg-train`'s resume and output folder (issue 23, section 4): what `resume_from_checkpoint` names is found or
refused before the model loads, a damaged or incomplete checkpoint is named, a finished run is not trained again, and
one run at a time writes into an output folder it can write to."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap

import pytest
from test_train_script import _argv

from sdpg_trl.checkpoints import LOCK_NAME, hold_output_dir, resume_argument
from sdpg_trl.scripts.train import main

# 2 optimiser steps, a checkpoint after each.
SAVE = ("--save_strategy", "steps", "--save_steps", "1")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    """A 2-step `sdpg-train` run with checkpoint-1 and checkpoint-2 (each test copies what it changes)."""
    run = tmp_path_factory.mktemp("run")
    assert main(_argv(tiny_model_dir, str(run), *SAVE)) is None
    assert (run / "checkpoint-2" / "optimizer.pt").is_file()
    return run


def copy_run(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    return run


def no_model(tmp_path) -> str:
    """A model path that does not exist: a test that gets past the checks fails on it, so each error below is shown
    to come before the model loads."""
    return str(tmp_path / "no-model")


@pytest.mark.parametrize(("text", "value"), [("true", True), ("True", True), ("false", None), ("ckpt", "ckpt")])
def test_resume_argument_reads_the_command_lines_text_as_yaml_does(text, value):
    assert resume_argument(text) == value


@pytest.mark.parametrize("flag", ["true", "True"])
def test_resume_true_on_the_command_line_takes_the_last_checkpoint(tmp_path, flag):
    with pytest.raises(ValueError, match=rf"resume_from_checkpoint=True, but output_dir \({tmp_path}\) has no"):
        main(_argv(no_model(tmp_path), str(tmp_path), "--resume_from_checkpoint", flag))


def test_a_missing_resume_path_is_named_before_the_model_loads(tmp_path):
    missing = tmp_path / "outputs" / "checkpoint-9"
    with pytest.raises(FileNotFoundError, match=rf"resume_from_checkpoint '{missing}' does not exist"):
        main(_argv(no_model(tmp_path), str(tmp_path), "--resume_from_checkpoint", str(missing)))


def test_a_run_folder_resumes_from_its_last_checkpoint_with_the_same_checks(finished_run, tmp_path, tiny_model_dir):
    run = copy_run(finished_run, tmp_path)
    with pytest.raises(ValueError, match=rf"Cannot resume from {run}/checkpoint-2 with other settings.*distill_coef"):
        main(_argv(no_model(tmp_path), str(tmp_path / "b"), "--resume_from_checkpoint", str(run), "--max_steps", "3",
                   "--distill_coef", "0.2"))  # fmt: skip
    (run / "checkpoint-2" / "trainer_state.json").unlink()  # not completely written: checkpoint-1 is taken
    out = tmp_path / "continued"
    main(_argv(tiny_model_dir, str(out), "--resume_from_checkpoint", str(run), "--max_steps", "3", *SAVE))
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3]
    # Step 1 is checkpoint-1's record (its measured step_time too): the run continued from it, not from scratch.
    assert history[0] == json.loads((run / "checkpoint-1" / "trainer_state.json").read_text())["log_history"][0]


def test_a_folder_that_is_not_a_checkpoint_is_refused_naming_what_to_pass(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(ValueError, match=r"model: it is not a checkpoint folder .* Pass a checkpoint-<step> folder"):
        main(_argv(no_model(tmp_path), str(tmp_path), "--resume_from_checkpoint", str(tmp_path / "model")))


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_a_checkpoint_without_its_training_state_warns_naming_the_file(finished_run, tmp_path, caplog, name):
    run = copy_run(finished_run, tmp_path)
    (run / "checkpoint-1" / name).unlink()
    with caplog.at_level(logging.WARNING, logger="sdpg_trl.checkpoints"), pytest.raises(OSError, match="no-model"):
        main(_argv(no_model(tmp_path), str(run), "--resume_from_checkpoint", str(run / "checkpoint-1")))
    assert f"RESUME NOT EXACT: {run / 'checkpoint-1'} has no {name}" in caplog.text


@pytest.mark.parametrize("name", ["model.safetensors", "rng_state.pth", "sdpg_settings.json", "optimizer.pt"])
def test_a_truncated_file_in_the_checkpoint_is_named_with_the_checkpoint(finished_run, tmp_path, name):
    run = copy_run(finished_run, tmp_path)
    path = run / "checkpoint-2" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"Cannot resume from {run / 'checkpoint-2'}: its {name} cannot be read"):
        main(_argv(no_model(tmp_path), str(run), "--resume_from_checkpoint", "true"))


def test_resuming_a_finished_run_says_it_is_complete_and_trains_nothing(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    assert main(_argv(no_model(tmp_path), str(run), "--resume_from_checkpoint", "true")) is None
    assert f"{run / 'checkpoint-2'} is the end of this run (max_steps 2" in capsys.readouterr().out
    assert not (run / "checkpoint-3").exists()


def test_a_second_run_into_a_held_output_dir_is_refused_until_the_first_ends(tmp_path):
    out = tmp_path / "out"
    code = textwrap.dedent(f"""
        import sys, time
        from sdpg_trl.checkpoints import hold_output_dir
        with hold_output_dir({str(out)!r}):
            print("held", flush=True)
            time.sleep(120)
    """)
    first = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=rf"output_dir {out} is in use by another run \(process {first.pid}\)"):
            main(_argv(no_model(tmp_path), str(out)))
    finally:
        first.kill()  # SIGKILL: no cleanup runs, the lock file stays
        first.wait()
    assert (out / LOCK_NAME).exists()
    with hold_output_dir(str(out)):  # the operating system released the killed run's lock
        pass


def test_an_output_dir_that_cannot_be_written_is_refused_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "out"  # cannot be created (a file is in the way), also for root, who may write anywhere
    with pytest.raises(PermissionError, match=rf"output_dir {out} is not writable"):
        main(_argv(no_model(tmp_path), str(out)))
