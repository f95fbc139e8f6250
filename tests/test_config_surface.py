"""What a user writes is what runs: method presets never overwrite a setting, `method: grpo` is GRPOConfig, and a
wrong type, value, package, model or data set is refused before any model is loaded, naming what is wrong."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
import transformers.training_args
import yaml
from conftest import make_dataset, make_model
from test_trainer import make_args, parity_reward
from trl import GRPOConfig, GRPOTrainer

import sdpg_trl.config
from sdpg_trl import SDPGConfig, SDPGTrainer
from sdpg_trl.checkpoints import SETTINGS_NAME, write_settings
from sdpg_trl.config import KL_ESTIMATORS, METHODS, docstring_entries
from sdpg_trl.parser import SDPGParser
from sdpg_trl.scripts.train import make_parser

FILLS = [(method, name, value) for method, preset in METHODS.items() for name, value in preset.fills.items()]
DEFINES = [(method, name, value) for method, preset in METHODS.items() for name, value in preset.defines.items()]
# An explicit value that differs from what the preset fills, where the dataclass default does not (or does not suit).
OTHER_THAN_FILLED = {"rlsd_coef": 0.3, "rlsd_decay_steps": 10, "rlsd_clip": 0.1}


def other_than_filled(name: str, filled) -> object:
    """The field's dataclass default (the value presets used to overwrite), unless the table names another."""
    return OTHER_THAN_FILLED.get(name, SDPGConfig.__dataclass_fields__[name].default)


def contradiction(name: str, defined) -> object:
    """A value of the same type as `defined` that contradicts it."""
    if name == "kl_estimator":
        return next(k for k in KL_ESTIMATORS if k != defined)
    if isinstance(defined, bool):
        return not defined
    return 3.0 if defined is None else defined + 0.5


def build(source: str, tmp_path, **settings) -> SDPGConfig:
    """An SDPGConfig with `settings` given as keyword arguments, as `--config` YAML keys, or as command-line flags."""
    settings = {"output_dir": str(tmp_path), "use_cpu": True, **settings}
    if source == "python":
        return SDPGConfig(**settings)
    parser = SDPGParser((SDPGConfig,))
    if source == "yaml":
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(settings))
        return parser.parse_args_and_config(args=["--config", str(path)])[0]
    return parser.parse_args_and_config(args=[x for k, v in settings.items() for x in (f"--{k}", str(v))])[0]


SOURCES = ("python", "yaml", "cli")


# ---------------------------------------------------------------------------------------------------------------------
# 0. Presets fill what the user left unset, never what the user set
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize(("method", "name", "value"), FILLS + DEFINES, ids=lambda x: str(x))
def test_preset_fills_what_the_user_left_unset(tmp_path, source, method, name, value):
    config = build(source, tmp_path, method=method)
    assert getattr(config, name) == value and name not in config.explicit_fields


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize(("method", "name", "filled"), FILLS, ids=lambda x: str(x))
def test_explicit_setting_wins_over_what_the_preset_fills(tmp_path, source, method, name, filled):
    value = other_than_filled(name, filled)
    config = build(source, tmp_path, method=method, **{name: value})
    assert getattr(config, name) == value and name in config.explicit_fields


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize(("method", "name", "defined"), DEFINES, ids=lambda x: str(x))
def test_setting_that_contradicts_the_method_is_refused_naming_both(tmp_path, source, method, name, defined):
    value = contradiction(name, defined)
    given, defining = re.escape(repr(value)), re.escape(repr(defined))
    message = rf"SDPGConfig\.{name}={given} contradicts method='{method}', which is defined by {name}={defining}"
    with pytest.raises(ValueError, match=message):
        build(source, tmp_path, method=method, **{name: value})
    if not (source == "cli" and defined is None):  # argparse has no flag value for None
        assert getattr(build(source, tmp_path, method=method, **{name: defined}), name) == defined  # agreeing is fine


def test_the_issues_examples(tmp_path):
    assert SDPGConfig(str(tmp_path), use_cpu=True, method="opcd", distill_positive_only=True).distill_positive_only
    with pytest.raises(ValueError, match=r"distill_coef=0\.001 contradicts method='sdpg_no_distill'"):
        SDPGConfig(str(tmp_path), use_cpu=True, method="sdpg_no_distill", distill_coef=0.001)
    with pytest.raises(ValueError, match=r"distill_coef=1\.0 contradicts method='grpo'"):
        SDPGConfig(str(tmp_path), use_cpu=True, method="grpo", distill_coef=1.0)
    with pytest.raises(ValueError, match=r"beta=0\.1 contradicts method='sdpg_no_anchor'"):
        SDPGConfig(str(tmp_path), use_cpu=True, method="sdpg_no_anchor", beta=0.1)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize(
    ("chosen", "filled", "adapted"),
    [({"loss_type": "cispo"}, "dual_clip", None), ({"use_bias_correction_kl": True}, "anchor_ratio_weighted", False)],
)
def test_a_value_sdpg_only_filled_gives_way_to_the_users_choice_and_says_so(
    tmp_path, caplog, source, chosen, filled, adapted
):
    with caplog.at_level("WARNING", logger="sdpg_trl.config"):
        config = build(source, tmp_path, method="sdpg_urkl", **chosen)
    assert getattr(config, filled) == adapted
    said = [r.getMessage() for r in caplog.records if f"SDPGConfig.{filled}=" in r.getMessage()]
    assert len(said) == 1 and f"is set to {adapted!r}" in said[0], said
    # Both written by the user: the contradiction is refused.
    both = {**chosen, filled: 2.0 if filled == "dual_clip" else True}
    with pytest.raises(ValueError, match=rf"SDPGConfig\.{filled if filled == 'dual_clip' else 'use_bias'}"):
        build(source, tmp_path, **both)


def test_non_finite_reward_weights_in_an_array_are_refused(tmp_path):
    for value in (np.array([float("nan")]), torch.tensor([1.0, float("inf")])):
        with pytest.raises(ValueError, match=r"SDPGConfig\.reward_weights must hold finite numbers only"):
            make_args(tmp_path, reward_weights=value)


@pytest.mark.parametrize("source", SOURCES)
def test_rlsd_needs_its_teacher_weight(tmp_path, source):
    with pytest.raises(ValueError, match=r"rlsd_coef=0\.0 contradicts method='rlsd', which needs rlsd_coef > 0"):
        build(source, tmp_path, method="rlsd", rlsd_coef=0.0)


@pytest.mark.parametrize("source", SOURCES)
def test_without_a_method_the_default_presets_settings_are_plain_defaults(tmp_path, source):
    config = build(source, tmp_path, kl_estimator="rkl")  # SDPG with another anchor, no preset named for it
    assert (config.method, config.kl_estimator) == ("sdpg_urkl", "rkl")


def test_parser_counts_flags_as_argparse_matches_them(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("method: grpo\nuse_cpu: true\n")
    args = ["--config", str(path), "--output_dir", str(tmp_path), "--no_anchor_ratio_weighted", "--beta=0.2"]
    config = SDPGParser((SDPGConfig,)).parse_args_and_config(args=args)[0]
    assert {"method", "use_cpu", "output_dir", "anchor_ratio_weighted", "beta"} <= config.explicit_fields
    assert "distill_coef" not in config.explicit_fields
    assert (config.beta, config.anchor_ratio_weighted, config.distill_coef) == (0.2, False, 0.0)


def test_sdpg_train_parses_with_the_explicit_fields_parser():
    assert isinstance(make_parser(), SDPGParser)


# ---------------------------------------------------------------------------------------------------------------------
# 1. `method: grpo` is TRL's GRPO; SDPG's defaults are the paper's
# ---------------------------------------------------------------------------------------------------------------------
def test_grpo_method_equals_grpo_config_on_every_shared_field(tmp_path):
    grpo, stock = SDPGConfig(str(tmp_path), method="grpo", use_cpu=True), GRPOConfig(str(tmp_path), use_cpu=True)
    differ = {f.name for f in dataclasses.fields(GRPOConfig) if getattr(grpo, f.name) != getattr(stock, f.name)}
    assert differ == set()  # none: every field GRPO has, `method: grpo` takes from GRPOConfig
    # while the SDPG methods keep the paper's
    sdpg = SDPGConfig(str(tmp_path), use_cpu=True)
    assert (sdpg.beta, sdpg.use_bias_correction_kl, stock.beta, stock.use_bias_correction_kl) == (1e-3, False, 0, True)


SDPG_DEFAULTS = {
    "method": "sdpg_urkl", "outcome_coef": 1.0, "distill_coef": 1e-3, "distill_warmup_steps": 50,
    "distill_decay_steps": 350, "distill_positive_only": True, "distill_exclude_eos": False,
    "distill_teacher_confident_only": False, "distill_chunk_size": 512, "rlsd_coef": 0.0, "rlsd_decay_steps": 50,
    "rlsd_clip": 0.2, "teacher_model_kind": "live", "teacher_update_rate": 0.05, "teacher_sync_steps": 1,
    "context_column": "privileged_context", "teacher_template": sdpg_trl.config.DEFAULT_TEACHER_TEMPLATE,
    "max_teacher_prompt_length": None, "teacher_context_truncation_side": "left",
    "max_consecutive_skipped_steps": 5, "log_term_grad_norms": False, "kl_estimator": "urkl", "beta": 1e-3,
    "anchor_ratio_weighted": True, "use_bias_correction_kl": False, "loss_type": "dapo",
    "on_policy_surrogate": "reinforce", "dual_clip": 3.0,
}  # fmt: skip


def test_sdpg_fields_and_defaults_are_unchanged(tmp_path):
    declared = SDPGConfig.__dict__["__annotations__"]
    assert {name: SDPGConfig.__dataclass_fields__[name].default for name in declared} == SDPG_DEFAULTS
    config = SDPGConfig(str(tmp_path), use_cpu=True)
    assert {name: getattr(config, name) for name in SDPG_DEFAULTS} == SDPG_DEFAULTS


def test_trainer_without_args_names_the_default_method_and_the_fix(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)  # the default config's output_dir
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)  # its bf16 on CPU
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)  # which bf16 sets; restored afterwards
    monkeypatch.setattr(GRPOTrainer, "__init__", lambda *a, **k: pytest.fail("loaded the model"))
    data = make_dataset().remove_columns("privileged_context")
    with pytest.raises(ValueError) as err:
        SDPGTrainer(model=tiny_model_dir, reward_funcs=parity_reward, train_dataset=data)
    message = str(err.value)
    assert "train_dataset has no privileged-context column 'privileged_context'" in message
    assert "no args, so it uses the default SDPGConfig: SDPG with a privileged teacher" in message
    assert "args=SDPGConfig(method='grpo')" in message


# ---------------------------------------------------------------------------------------------------------------------
# 4. Wrong types, non-finite numbers, missing packages, models and data sets: refused before any model loads
# ---------------------------------------------------------------------------------------------------------------------
WRONG_TYPES = [
    ("distill_coef", [1, 2], "float"), ("distill_coef", None, "float"), ("max_steps", 1.5, "int"),
    ("max_steps", True, "int"), ("distill_positive_only", "yes", "bool"), ("context_column", 3, "str"),
    ("max_teacher_prompt_length", 2.5, "int or None"), ("learning_rate", "fast", "float"),
    ("dual_clip", [3.0], "float or None"),
]  # fmt: skip


# In YAML as in Python (argparse converts a string, from a flag or YAML, itself and names the flag).
@pytest.mark.parametrize(
    ("source", "name", "value", "expected"),
    [(source, *case) for source in ("python", "yaml") for case in WRONG_TYPES
     if source == "python" or not isinstance(case[1], str)],
)  # fmt: skip
def test_wrong_type_names_the_key_and_the_expected_type(tmp_path, source, name, value, expected):
    with pytest.raises(TypeError, match=rf"SDPGConfig\.{name} must be {expected}, got {re.escape(repr(value))}"):
        build(source, tmp_path, **{name: value})


@pytest.mark.parametrize(
    "value", [np.float32("nan"), np.float64("inf"), torch.tensor(float("nan")), np.array(float("-inf")), float("nan")]
)
def test_non_finite_numbers_of_any_kind_are_refused(tmp_path, value):
    with pytest.raises(ValueError, match=r"SDPGConfig\.beta must hold finite numbers only"):
        make_args(tmp_path, beta=value)
    with pytest.raises(ValueError, match=r"SDPGConfig\.reward_weights must hold finite numbers only"):
        make_args(tmp_path, reward_weights=[1.0, value])


def test_numpy_and_tensor_numbers_become_python_numbers(tmp_path):
    config = make_args(tmp_path, beta=np.float32(0.5), distill_coef=torch.tensor(0.25), max_steps=np.int64(3))
    assert (config.beta, config.distill_coef, config.max_steps) == (0.5, 0.25, 3)
    assert (type(config.beta), type(config.distill_coef), type(config.max_steps)) == (float, float, int)
    assert type(make_args(tmp_path, warmup_steps=10).warmup_steps) is int  # Python's own numbers stay as given


@pytest.mark.parametrize(
    "settings",
    [
        {"reward_weights": np.array([1.0, 2.0])},
        {"reward_weights": torch.tensor([1.0, 2.0])},
        {"reward_weights": [np.float32(1.0), 2.0]},
        {"dual_clip": np.float32(2.0)},
        {"dual_clip": torch.tensor(2.0)},
        {"max_teacher_prompt_length": np.int64(100)},
    ],
    ids=["array", "tensor", "list-of-numpy", "optional-float", "optional-tensor", "optional-int"],
)
def test_numpy_and_torch_values_are_written_into_a_checkpoints_settings(tmp_path, settings):
    # The loss settings are written as JSON at every checkpoint: a numpy or torch value would fail there, hours in.
    config = make_args(tmp_path, **settings)
    ((name, value),) = settings.items()
    plain = getattr(config, name)
    assert plain == (value.tolist() if hasattr(value, "tolist") else [float(x) for x in value])
    write_settings(str(tmp_path), config)
    written = json.loads((tmp_path / SETTINGS_NAME).read_text())
    assert written.get(name, plain) == plain
    json.dumps(config.to_dict())  # and the whole config, as transformers logs and saves it


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if GRPOTrainer starts (it loads the model first)."""
    monkeypatch.setattr(GRPOTrainer, "__init__", lambda *a, **k: pytest.fail("GRPOTrainer loaded the model"))


@pytest.mark.parametrize(
    ("settings", "module", "message"),
    [
        ({"report_to": ["wandb"]}, None, r"report_to='wandb' needs the wandb package \(`pip install wandb`"),
        ({"report_to": "comet_ml"}, None, r"report_to='comet_ml' needs the comet-ml package"),
        ({"use_vllm": True}, "vllm", r"use_vllm=True needs the vllm package \(`pip install \"sdpg-trl\[vllm\]\"`\)"),
        ({"use_liger_kernel": True}, "liger_kernel", r"use_liger_kernel=True needs the liger_kernel package"),
        ({}, "deepspeed", r"DeepSpeed \(.*accelerate config\) needs the deepspeed package"),
    ],
)
def test_missing_packages_are_named_before_the_model_loads(
    tmp_path, monkeypatch, tiny_model_dir, no_model_load, settings, module, message
):
    monkeypatch.setitem(sdpg_trl.config._REPORTERS, "wandb", (lambda: False, "wandb"))
    monkeypatch.setitem(sdpg_trl.config._REPORTERS, "comet_ml", (lambda: False, "comet-ml"))
    monkeypatch.setattr(sdpg_trl.config, "is_installed", lambda name: name != module)
    args = make_args(tmp_path, **settings)
    if module == "deepspeed":
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # as `accelerate launch` with a DeepSpeed config
    with pytest.raises(ImportError, match=message):
        SDPGTrainer(model=tiny_model_dir, reward_funcs=parity_reward, args=args, train_dataset=make_dataset())


def test_every_report_to_integration_has_a_package():
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    assert set(sdpg_trl.config._REPORTERS) == set(INTEGRATION_TO_CALLBACK)


@pytest.mark.parametrize("rows", [0, 1])
def test_training_set_smaller_than_one_generation_batch_is_refused(tmp_path, tiny_model_dir, no_model_load, rows):
    # 4 completions per device x 2 steps per generation / 4 generations = 2 prompts per generation batch
    args = make_args(tmp_path, per_device_train_batch_size=4, num_generations=4, steps_per_generation=2)
    message = rf"train_dataset has {rows} rows, fewer than one generation batch takes: 2 prompts"
    with pytest.raises(ValueError, match=message):
        SDPGTrainer(model=tiny_model_dir, reward_funcs=parity_reward, args=args,
                    train_dataset=make_dataset(2).select(range(rows)))  # fmt: skip


@pytest.mark.parametrize("path", ["./no/such/model", "/no/such/model", "~/no-such-model", "org/name/extra"])
def test_missing_local_model_path_says_it_does_not_exist(tmp_path, no_model_load, path):
    with pytest.raises(FileNotFoundError, match=rf"The model path '{re.escape(path)}' does not exist"):
        SDPGTrainer(model=path, reward_funcs=parity_reward, args=make_args(tmp_path), train_dataset=make_dataset())


@pytest.mark.parametrize(
    ("settings", "needs"),
    [
        ({"beta": 0.1}, r"beta=0\.1 needs a reference model"),
        ({"beta": 0.0, "teacher_model_kind": "base"}, r"teacher_model_kind='base' needs a copy of the initial"),
        ({"beta": 0.0, "teacher_model_kind": "ema"}, r"teacher_model_kind='ema' needs a copy of the initial"),
    ],
)
def test_model_object_without_checkpoint_is_refused_when_a_copy_is_needed(
    tmp_path, tokenizer, no_model_load, settings, needs
):
    model = make_model(tokenizer)  # built from a config: no checkpoint to load the reference or teacher from
    with pytest.raises(ValueError, match=rf"model object whose config names no checkpoint .* but {needs}"):
        SDPGTrainer(model=model, reward_funcs=parity_reward, args=make_args(tmp_path, **settings),
                    train_dataset=make_dataset(), processing_class=tokenizer)  # fmt: skip


def test_model_object_trains_when_no_copy_is_needed(tmp_path, tokenizer):
    model = make_model(tokenizer)
    trainer = SDPGTrainer(model=model, reward_funcs=parity_reward, args=make_args(tmp_path, beta=0.0),
                          train_dataset=make_dataset(), processing_class=tokenizer)  # fmt: skip
    assert trainer.ref_model is None and trainer.teacher.model is None


def test_teacher_context_column_is_the_column_the_method_reads(tmp_path):
    assert make_args(tmp_path, context_column="hint").teacher_context_column == "hint"
    assert make_args(tmp_path, method="grpo", context_column="hint").teacher_context_column is None


# ---------------------------------------------------------------------------------------------------------------------
# 5. One text per field: the docstring entry is the `--help`
# ---------------------------------------------------------------------------------------------------------------------
def test_every_declared_field_has_its_docstring_entry_as_help():
    entries = docstring_entries(SDPGConfig.__doc__)
    declared = SDPGConfig.__dict__["__annotations__"]
    assert set(entries) == set(declared)
    for name in declared:
        assert SDPGConfig.__dataclass_fields__[name].metadata["help"] == entries[name], name
    help_text = " ".join(SDPGParser((SDPGConfig,)).format_help().split())
    assert " ".join(entries["distill_coef"].split()) in help_text


def test_fields_are_declared_in_the_order_of_the_docstring():
    entries = list(docstring_entries(SDPGConfig.__doc__))
    assert list(SDPGConfig.__dict__["__annotations__"]) == entries


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"reward_weights": ["x"]}, r"SDPGConfig\.reward_weights must be list of float or None, got \['x'\]"),
        ({"generation_kwargs": [1]}, r"SDPGConfig\.generation_kwargs must be dict or str or None, got \[1\]"),
        ({"use_peft": True, "lora_r": 2.5}, r"lora_r \(ModelConfig\) must be int, got 2\.5 of type float"),
        ({"eval_k": "four"}, r"eval_k \(SDPGScriptArguments\) must be int, got 'four'"),
    ],
)
def test_recipe_fields_outside_sdpg_config_are_type_checked_by_key(tmp_path, settings, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path), "use_cpu": True, **settings}))
    with pytest.raises(TypeError, match=message):
        make_parser().parse_args_and_config(args=["--config", str(path)])


def test_a_recipe_may_give_one_text_for_a_list_of_texts(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path), "use_cpu": True, "lora_target_modules": "all-linear",
                                    "reward_weights": [1.0], "eval_dataset_name": "aime24"}))  # fmt: skip
    script_args, config, model_args = make_parser().parse_args_and_config(args=["--config", str(path)])[:3]
    assert model_args.lora_target_modules == "all-linear" and config.reward_weights == [1.0]


def test_teacher_settings_under_a_method_without_a_teacher_warn_that_they_have_no_effect(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="sdpg_trl.config"):
        SDPGConfig(str(tmp_path), use_cpu=True, method="grpo", teacher_model_kind="ema", teacher_update_rate=0.1)
    assert (
        "SDPGConfig.teacher_model_kind, teacher_update_rate has no effect: method='grpo' has no teacher" in caplog.text
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="sdpg_trl.config"):
        SDPGConfig(str(tmp_path), use_cpu=True, teacher_model_kind="ema")  # SDPG reads it: no warning
    assert "no effect" not in caplog.text
