"""`sdpg-compare` checks every run once before the first starts (model and configuration), with `sdpg-train`'s parser
handed down to `sdpg_trl.compare` (the package does not import the scripts)."""

from __future__ import annotations

import ast
import inspect
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
