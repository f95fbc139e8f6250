"""A recipe written for `trl grpo --config` runs under `sdpg-train` with `method: grpo` added, and logs the same
numbers; with an SDPG method and `context_column: solution` it trains. Plus the pieces that make it so: TRL's reward
names, TRL's script arguments, TRL's evaluation of the held-out split, and TRL's accelerate configs by name."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trl.scripts.grpo as trl_grpo_script
import yaml
from conftest import make_tokenizer
from datasets import Dataset
from transformers import LlamaConfig, LlamaForSequenceClassification

import sdpg_trl.preflight
from sdpg_trl.rewards import REWARD_FUNCS, TRL_OVERLONG_PUNISHMENT, get_reward_funcs, trl_reward_funcs
from sdpg_trl.scripts import recipes
from sdpg_trl.scripts import train as train_script

WORKTREE = Path(__file__).resolve().parents[1]
TRL_CLI = Path(sys.executable).with_name("trl")
# What changes from run to run of the same computation: wall-clock timings.
TIMINGS = ("runtime", "per_second", "step_time")
REGISTRY = "reward_funcs_registry"  # the dict of reward names in TRL's GRPO script


@pytest.fixture(scope="module")
def trl_recipe(tmp_path_factory, tiny_model_dir) -> Path:
    """A `trl grpo` recipe as a TRL user writes it: a local model folder, a local data folder with `prompt` and
    `solution`, TRL's reward names plus a reward model (so that the advantages, hence the gradient, are not zero),
    and TRL's evaluation of the held-out split every step."""
    root = tmp_path_factory.mktemp("trl-recipe")
    rows = [{"prompt": [{"role": "user", "content": f"what is {i} plus {i + 1} ?"}], "solution": str(2 * i + 1)}
            for i in range(6)]  # fmt: skip
    (root / "data" / "data").mkdir(parents=True)  # laid out as a Hub data set repository: split by file name
    Dataset.from_list(rows[:4]).to_parquet(root / "data" / "data" / "train-00000-of-00001.parquet")
    Dataset.from_list(rows[4:]).to_parquet(root / "data" / "data" / "test-00000-of-00001.parquet")
    tokenizer = make_tokenizer()
    torch.manual_seed(1)
    reward_model = LlamaForSequenceClassification(
        LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    )  # fmt: skip
    reward_model.save_pretrained(root / "rm")
    tokenizer.save_pretrained(root / "rm")
    recipe = {
        "model_name_or_path": tiny_model_dir,
        "dataset_name": str(root / "data"),
        "reward_funcs": ["accuracy_reward", "think_format_reward"],
        "reward_model_name_or_path": str(root / "rm"),
        "ignore_bias_buffers": False,  # one of TRL's script fields, which sdpg-train used to reject
        "seed": 0, "max_steps": 2, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
        "num_generations": 4, "max_completion_length": 6,
        "eval_strategy": "steps", "eval_steps": 1, "logging_steps": 1,
        # `trl grpo` writes no trainer_state.json of its own: the last checkpoint's holds the log history.
        "save_strategy": "steps", "save_steps": 2,
        "report_to": "none", "use_cpu": True, "bf16": False,
    }  # fmt: skip
    path = root / "grpo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(WORKTREE), "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def both_clis(trl_recipe) -> tuple[list[dict], list[dict]]:
    """The log histories of `trl grpo --config X` and `sdpg-train --config X --method grpo`, seeded, 2 steps."""
    assert train_script.LAUNCHED not in os.environ
    root = trl_recipe.parent
    _run([str(TRL_CLI), "grpo", "--config", str(trl_recipe), "--output_dir", str(root / "trl")], root)
    # Through `accelerate launch` too, as `trl grpo` runs: TRL's single_gpu config, by name, in fp32 on a CPU.
    sdpg = [sys.executable, "-m", "sdpg_trl.scripts.train", "--config", str(trl_recipe), "--method", "grpo",
            "--accelerate_config", "single_gpu", "--mixed_precision", "no"]  # fmt: skip
    _run([*sdpg, "--output_dir", str(root / "sdpg")], root)
    states = [json.loads((root / run / "checkpoint-2" / "trainer_state.json").read_text()) for run in ("trl", "sdpg")]
    return states[0]["log_history"], states[1]["log_history"]


def test_a_trl_grpo_recipe_logs_the_same_numbers_under_both_clis(both_clis):
    trl_log, sdpg_log = both_clis
    assert [entry["step"] for entry in sdpg_log] == [entry["step"] for entry in trl_log] == [1, 1, 2, 2]
    assert any("eval_reward" in entry for entry in trl_log)  # TRL's evaluation of the held-out split ran
    assert all(entry.get("reward_std", 1) > 0 for entry in trl_log)  # the reward model's scores vary: a real gradient
    for trl_entry, sdpg_entry in zip(trl_log, sdpg_log, strict=True):
        compared = [key for key in trl_entry if not key.endswith("loss") and not any(t in key for t in TIMINGS)]
        assert "rewards/rm/mean" in compared or "eval_rewards/rm/mean" in compared  # the reward model was used
        for key in compared:
            # The same sampling, rewards and advantages; the log-probs and the gradient come from sdpg's tiled LM
            # head instead of TRL's, which may round the last bits differently, hence 1e-6 and not bit equality.
            assert sdpg_entry[key] == pytest.approx(trl_entry[key], rel=1e-6, abs=1e-9), (trl_entry["step"], key)


def test_a_trl_grpo_recipe_logs_the_same_loss_under_both_clis(both_clis):
    """`method: grpo` takes GRPO's on-policy surrogate value (`on_policy_surrogate="ratio"`), so the logged losses are
    GRPOTrainer's, not only the gradients."""
    trl_log, sdpg_log = both_clis
    for trl_entry, sdpg_entry in zip(trl_log, sdpg_log, strict=True):
        for key in ("loss", "eval_loss"):
            if key in trl_entry:
                assert sdpg_entry[key] == pytest.approx(trl_entry[key], rel=1e-5, abs=1e-7), (trl_entry["step"], key)


def test_a_trl_grpo_recipe_without_a_method_says_how_to_name_the_context_or_run_grpo(trl_recipe):
    message = (r"has no privileged-context column 'privileged_context'; its columns are \['prompt', 'solution'\]\. .*"
               r"The teacher reads its privileged context from this column: set context_column: <column> to read it "
               r"from another one, or method: grpo to train plain GRPO without a teacher\.")  # fmt: skip
    with pytest.raises(ValueError, match=message):
        train_script.main(["--config", str(trl_recipe)])


def test_a_trl_grpo_recipe_trains_an_sdpg_method_on_its_solution_column(trl_recipe, tmp_path):
    out = tmp_path / "sdpg-urkl"
    train_script.main([
        "--config", str(trl_recipe), "--method", "sdpg_urkl", "--context_column", "solution", "--max_steps", "1",
        "--distill_coef", "0.1", "--distill_warmup_steps", "0", "--distill_decay_steps", "0",
        "--output_dir", str(out),
    ])  # fmt: skip
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    [train] = [entry for entry in history if "loss" in entry]
    [evaluation] = [entry for entry in history if "eval_loss" in entry]  # the held-out split has the context too
    assert train["sdpg/distill_coef"] == pytest.approx(0.1) and "rewards/accuracy_reward/mean" in train
    assert "eval_reward" in evaluation


# ---------------------------------------------------------------------------------------------------------------------
# Reward names: TRL's registry, then the project's, then dotted paths
# ---------------------------------------------------------------------------------------------------------------------
def _trl_grpo_registry() -> tuple[list[str], dict]:
    """The names `trl grpo` resolves (the `reward_funcs_registry` dict of its script) and the keyword values it
    builds `get_soft_overlong_punishment` with, read from TRL's source."""
    tree = ast.parse(inspect.getsource(trl_grpo_script))
    assignments = [node for node in ast.walk(tree) if isinstance(node, ast.Assign)]
    [registry] = [node.value for node in assignments if [getattr(t, "id", None) for t in node.targets] == [REGISTRY]]
    [overlong] = [v for v in registry.values if isinstance(v, ast.Call)]
    return [key.value for key in registry.keys], {kw.arg: kw.value.value for kw in overlong.keywords}


def test_trl_reward_names_are_the_ones_trl_grpo_resolves():
    names, overlong = _trl_grpo_registry()
    assert sorted(trl_reward_funcs()) == sorted(names)
    assert overlong == TRL_OVERLONG_PUNISHMENT
    funcs = get_reward_funcs(names)
    assert [f.__name__ for f in funcs[:3]] == names[:3]  # TRL logs each reward under its function's name
    # TRL's names first, then the project's, each still resolving to its own function.
    assert get_reward_funcs(["accuracy_reward", "math_accuracy_reward"])[1] is REWARD_FUNCS["math_accuracy_reward"]


def test_an_unknown_reward_name_lists_every_known_one():
    with pytest.raises(ValueError, match="Unknown reward function 'accuracy'") as err:
        get_reward_funcs(["accuracy"])
    assert "think_format_reward" in str(err.value) and "lenient_math_accuracy_reward" in str(err.value)


def test_a_dotted_reward_path_imports_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_for_sdpg_test.py").write_text("def ones(completions, **kwargs):\n    return [1.0]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    [func] = get_reward_funcs(["my_rewards_for_sdpg_test.ones"])
    assert func(completions=["x"]) == [1.0]


# ---------------------------------------------------------------------------------------------------------------------
# Script arguments: TRL's dataclasses
# ---------------------------------------------------------------------------------------------------------------------
def test_without_reward_funcs_a_reward_model_alone_is_the_reward_as_in_trl(tmp_path):
    parse = train_script.make_parser().parse_args_and_config
    alone, _, _ = parse(["--model_name_or_path", "m", "--reward_model_name_or_path", "rm", "--use_cpu", "true"])
    default, _, _ = parse(["--model_name_or_path", "m", "--use_cpu", "true"])
    assert alone.reward_funcs is None and default.reward_funcs == [train_script.DEFAULT_REWARD]
    empty = tmp_path / "empty.yaml"
    empty.write_text("reward_funcs: []\n")
    with pytest.raises(ValueError, match="reward_funcs is empty"):
        parse(["--config", str(empty), "--model_name_or_path", "m", "--use_cpu", "true"])


def test_every_field_of_trls_grpo_script_arguments_is_accepted():
    ours = {f.name for f in dataclasses.fields(train_script.SDPGScriptArguments)}
    theirs = {f.name for f in dataclasses.fields(trl_grpo_script.GRPOScriptArguments)}
    assert theirs <= ours
    assert issubclass(train_script.SDPGScriptArguments, trl_grpo_script.GRPOScriptArguments)
    argv = ["--model_name_or_path", "m", "--reward_funcs", "accuracy_reward", "--reward_model_name_or_path", "rm",
            "--ignore_bias_buffers", "true", "--use_cpu", "true"]  # fmt: skip
    script_args, _, _ = train_script.make_parser().parse_args_and_config(argv)
    assert (script_args.reward_model_name_or_path, script_args.ignore_bias_buffers) == ("rm", True)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset_streaming", "true", "--reward_funcs", "accuracy_reward"], "dataset_streaming"),
        (["--reward_funcs", "no_such_reward"], "Unknown reward function 'no_such_reward'"),
    ],
)
def test_script_arguments_refuse_what_sdpg_train_cannot_do_while_parsing(argv, message):
    with pytest.raises(ValueError, match=message):
        train_script.make_parser().parse_args_and_config(["--model_name_or_path", "m", "--use_cpu", "true", *argv])


def test_eval_strategy_without_a_held_out_split_fails_before_the_model_loads(tmp_path):
    data = tmp_path / "train_only.jsonl"
    data.write_text(json.dumps({"prompt": "what is 1 plus 1 ?", "solution": "2"}) + "\n")
    argv = ["--model_name_or_path", str(tmp_path / "no-model"), "--dataset_name", str(data), "--method", "grpo",
            "--reward_funcs", "accuracy_reward", "--eval_strategy", "steps", "--eval_steps", "1",
            "--output_dir", str(tmp_path), "--use_cpu", "true", "--report_to", "none"]  # fmt: skip
    with pytest.raises(ValueError, match="eval_strategy needs a held-out set"):
        train_script.main(argv)


# ---------------------------------------------------------------------------------------------------------------------
# Accelerate configs: TRL's, by name
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def launches(monkeypatch) -> list:
    """What `sdpg-train` hands to `accelerate launch` (nothing is launched)."""
    monkeypatch.setenv(train_script.LAUNCHED, "")  # restored after the test: `launch` sets it
    calls = []
    monkeypatch.setattr(train_script, "launch_command", calls.append)
    return calls


def test_accelerate_config_names_one_of_trls_configs_as_trl_grpo_does(trl_recipe, launches):
    train_script.main(["--config", str(trl_recipe), "--method", "grpo", "--accelerate_config", "zero2",
                       "--num_processes", "2"])  # fmt: skip
    [args] = launches
    assert Path(args.config_file) == recipes.recipe_path("zero2") == recipes.accelerate_configs()["zero2"]
    assert args.num_processes == 2 and args.module and args.training_script == "sdpg_trl.scripts.train"
    assert args.training_script_args == ["--config", str(trl_recipe), "--method", "grpo"]
    assert os.environ[train_script.LAUNCHED] == "1"


def test_accelerate_config_in_the_recipe_launches_and_the_launched_process_trains(trl_recipe, launches, monkeypatch):
    recipe = trl_recipe.with_name("with_accelerate_config.yaml")
    recipe.write_text(trl_recipe.read_text() + "accelerate_config: zero3\n")
    train_script.main(["--config", str(recipe)])
    [args] = launches
    assert Path(args.config_file) == recipes.recipe_path("accelerate/zero3")
    # In the launched process the same recipe trains, instead of launching again.
    trained = []
    monkeypatch.setattr(train_script, "train", lambda *parsed: trained.append(parsed))
    monkeypatch.setattr(train_script, "end_training", lambda trainer: None)
    train_script.main(["--config", str(recipe)])
    assert len(trained) == 1 and len(launches) == 1


def test_under_the_users_accelerate_launch_a_recipes_accelerate_config_does_not_launch_again(
    trl_recipe, launches, monkeypatch, caplog
):
    # `accelerate launch -m sdpg_trl.scripts.train --config recipe.yaml`, the recipe setting accelerate_config.
    recipe = trl_recipe.with_name("with_accelerate_config.yaml")
    recipe.write_text(trl_recipe.read_text() + "accelerate_config: multi_gpu\n")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what every accelerate launcher sets
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    trained = []
    monkeypatch.setattr(train_script, "train", lambda *parsed: trained.append(parsed))
    with caplog.at_level("WARNING", logger="sdpg_trl.scripts.train"):
        train_script.main(["--config", str(recipe)])
    assert len(trained) == 1 and not launches
    assert "accelerate_config is not applied: this process was started by `accelerate launch`" in caplog.text


def test_a_deepspeed_accelerate_config_without_deepspeed_names_the_extra_before_launching(
    trl_recipe, launches, monkeypatch
):
    monkeypatch.setattr(sdpg_trl.preflight, "is_installed", lambda name: name != "deepspeed")
    with pytest.raises(ImportError, match=r'runs DeepSpeed, and the deepspeed package is not installed: pip install '
                                          r'"sdpg-trl\[deepspeed\]"'):  # fmt: skip
        train_script.main(["--config", str(trl_recipe), "--method", "grpo", "--accelerate_config", "zero2"])
    assert not launches
    train_script.main(["--config", str(trl_recipe), "--method", "grpo", "--accelerate_config", "multi_gpu"])
    assert len(launches) == 1  # a config without DeepSpeed launches


def test_unknown_flags_are_still_refused_without_accelerate_config(trl_recipe, launches, capsys):
    with pytest.raises(SystemExit):
        train_script.main(["--config", str(trl_recipe), "--distill_coeff", "1"])
    assert "--distill_coeff" in capsys.readouterr().err and not launches


def test_sdpg_recipes_resolves_trls_accelerate_configs():
    for name in ("zero2", "zero3", "fsdp2", "multi_gpu", "single_gpu"):
        path = recipes.recipe_path(name)
        assert path == recipes.recipe_path(f"accelerate/{name}.yaml") and path.parent.name == "accelerate_configs"
        assert path.is_file() and "trl" in path.parts
    assert recipes.main(["path", "zero3"]) == 0
