"""`sdpg-compare` checks every run once before the first starts (model and configuration), with `sdpg-train`'s parser
handed down to `sdpg_trl.compare` (the package does not import the scripts)."""

from __future__ import annotations

import ast
import inspect
import json
import re

import pytest
import yaml

import sdpg_trl.compare as compare
import sdpg_trl.scripts.compare as script


@pytest.fixture
def comparison(tmp_path, monkeypatch) -> tuple:
    """A two-method comparison recipe, and the runs `sdpg-compare` would start (none is)."""
    config = tmp_path / "compare.yaml"
    train = {"max_steps": 1, "use_cpu": True}
    config.write_text(yaml.safe_dump({"train": train, "methods": {"a": {}, "b": {}}, "seeds": [0, 1]}))
    started = []
    monkeypatch.setattr(script, "train_in_subprocess", started.append)
    return config, started


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("{tmp}/no-such-model", "model_name_or_path {tmp}/no-such-model does not exist"),
        ("{tmp}/compare.yaml", "is a file, not a model folder"),
        ("not a hub id!", "neither an existing folder nor a valid Hub id"),
    ],
)
def test_a_bad_model_fails_once_naming_the_run_before_any_starts(comparison, tmp_path, model, message):
    config, started = comparison
    model = model.format(tmp=tmp_path)
    with pytest.raises(ValueError, match=f"Method 'a', seed 0: .*{re.escape(message.format(tmp=tmp_path))}"):
        script.main(["--config", str(config), "--output_dir", str(tmp_path / "out"), "--model_name_or_path", model])
    assert started == [] and not (tmp_path / "out").exists()


def test_a_bad_flag_fails_once_naming_the_run_before_any_starts(comparison, tmp_path, tiny_model_dir):
    config, started = comparison
    recipe = yaml.safe_load(config.read_text())
    recipe["methods"]["b"] = {"reward_funcs": ["no_such_reward"]}
    config.write_text(yaml.safe_dump(recipe))
    argv = ["--config", str(config), "--output_dir", str(tmp_path / "out"), "--model_name_or_path", tiny_model_dir]
    with pytest.raises(ValueError, match="Method 'b', seed 0: its configuration does not parse: .*no_such_reward"):
        script.main(argv)
    assert started == []


def test_the_comparison_package_does_not_import_the_scripts():
    tree = ast.parse(inspect.getsource(compare))
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [name for name in imported if "scripts" in name], imported


def test_a_type_error_in_a_method_keeps_its_per_method_wording(comparison, tmp_path, tiny_model_dir):
    config, started = comparison
    recipe = yaml.safe_load(config.read_text())
    recipe["methods"]["b"] = {"distill_coef": [1.0]}  # SDPGConfig's type check raises TypeError
    config.write_text(yaml.safe_dump(recipe))
    argv = ["--config", str(config), "--output_dir", str(tmp_path / "out"), "--model_name_or_path", tiny_model_dir]
    with pytest.raises(
        ValueError, match="Method 'b', seed 0: its configuration does not parse: .*distill_coef must be"
    ):
        script.main(argv)
    assert started == []


def test_an_empty_model_folder_or_a_missing_tracker_fails_once_before_any_run(comparison, tmp_path, tiny_model_dir):
    config, started = comparison
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["--config", str(config), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=f"Method 'a', seed 0: model_name_or_path {empty} is an empty folder"):
        script.main([*argv, "--model_name_or_path", str(empty)])
    recipe = yaml.safe_load(config.read_text())
    recipe["train"]["report_to"] = "wandb"
    config.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="Method 'a', seed 0 needs what is not installed: report_to='wandb' needs"):
        script.main([*argv, "--model_name_or_path", tiny_model_dir])
    assert started == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../victim", "a/b", "..", ".", "/abs", "a\\b", ""])
def test_a_method_name_that_is_not_a_plain_folder_name_is_refused(tmp_path, name):
    victim = tmp_path / "victim" / "seed0"
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("not sdpg-compare's")  # an "unfinished run folder" outside --output_dir
    config = tmp_path / "compare.yaml"
    config.write_text(yaml.safe_dump({"train": {"max_steps": 1}, "methods": {name: {}}, "seeds": [0]}))
    with pytest.raises(ValueError, match="is not a plain folder name"):
        script.main(["--config", str(config), "--output_dir", str(tmp_path / "out"), "--dry_run"])
    assert (victim / "keep.txt").is_file()


def test_nothing_outside_the_output_folder_is_deleted(tmp_path):
    outside = tmp_path / "victim" / "seed0"
    outside.mkdir(parents=True)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "m").symlink_to(tmp_path / "victim")  # a link inside the output folder that leads out
    recipe = {"train": {"max_steps": 1}, "methods": {"m": {}}, "seeds": [0]}
    (run,) = compare.plan_runs(recipe, tmp_path / "out")
    with pytest.raises(ValueError, match="Refusing to delete"):
        compare.execute([run], train=lambda run: None, echo=print)
    assert outside.is_dir()
    forged = compare.Run("../victim", 0, tmp_path / "out" / ".." / "victim" / "seed0", {}, tmp_path / "out")
    with pytest.raises(ValueError, match="Refusing to delete"):
        compare.clear_run_folder(forged)
    assert outside.is_dir()


def test_the_dry_run_shows_the_real_paths(tmp_path, monkeypatch, capsys):
    config = tmp_path / "compare.yaml"
    config.write_text(yaml.safe_dump({"train": {"max_steps": 1}, "methods": {"a": {}}, "seeds": [0]}))
    monkeypatch.chdir(tmp_path)
    script.main(["--config", str(config), "--output_dir", "out/../out2", "--dry_run"])
    assert f"a seed 0: {tmp_path / 'out2' / 'a' / 'seed0'} (to run)" in capsys.readouterr().out


def test_without_matplotlib_the_comparison_warns_before_the_runs_and_writes_the_tables(
    comparison, tmp_path, monkeypatch, capsys
):
    import sdpg_trl.plotting as plotting

    config, _ = comparison

    def no_matplotlib():
        raise ImportError(f"Plotting needs matplotlib: {plotting.PLOTS_EXTRA}.")

    monkeypatch.setattr(plotting, "pyplot", no_matplotlib)
    monkeypatch.setattr(script, "pyplot", no_matplotlib)
    trained = []

    def fake_train(run):
        out = capsys.readouterr().out  # the warning came before the first run
        trained.append("the report will have no figures" in out or bool(trained))
        run.folder.mkdir(parents=True, exist_ok=True)
        log = [{"step": 1, "reward": 0.5}, {"step": 1, "eval_accuracy": 0.25}]
        (run.folder / "trainer_state.json").write_text(json.dumps({"log_history": log}))

    monkeypatch.setattr(script, "train_in_subprocess", fake_train)
    out = tmp_path / "out"
    script.main(["--config", str(config), "--output_dir", str(out), "--model_name_or_path", "unused"])
    assert trained == [True] * 4
    assert "Warning: no figures written" in capsys.readouterr().out
    assert (out / "results.md").is_file() and not list(out.glob("*.png"))
    script.main(["--output_dir", str(out), "--render_only"])
    assert "Warning: no figures written" in capsys.readouterr().out and not list(out.glob("*.png"))


def test_plot_curves_makes_its_folder(tmp_path):
    from sdpg_trl.plotting import plot_curves

    written = plot_curves([{"step": 1, "reward": 0.5}, {"step": 2, "reward": 0.7}], tmp_path / "new" / "folder")
    assert written == [tmp_path / "new" / "folder" / "reward.png"] and written[0].is_file()
