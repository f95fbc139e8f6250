"""Every shipped recipe parses into the training script's dataclasses, every accelerate config loads in accelerate,
and `sdpg-recipes` lists and locates them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils.constants import FSDP2_STATE_DICT_TYPE

from sdpg_trl import SDPGConfig
from sdpg_trl.config import METHODS
from sdpg_trl.scripts import demo, recipes
from sdpg_trl.scripts.train import SDPGScriptArguments, make_parser

RECIPES = recipes.recipes_dir()  # the package data, i.e. what a wheel ships
TRAINING_RECIPES = sorted(p for p in RECIPES.glob("*.yaml") if not p.stem.startswith("compare_"))  # sdpg-compare's
ACCELERATE_CONFIGS = recipes.accelerate_configs()  # TRL's, by name


def _parse(path: Path, *extra: str):
    # transformers refuses bf16 without a GPU unless use_cpu is set; this machine has none, so the GPU recipes are
    # parsed as if for CPU. Nothing else about them changes.
    argv = ["--config", str(path), "--use_cpu", "true", *extra]
    return make_parser().parse_args_and_config(args=argv, fail_with_unknown_args=True)


def test_the_expected_recipes_exist():
    assert {p.stem for p in TRAINING_RECIPES} >= {
        "qwen3_4b_sdpg_urkl", "qwen3_4b_sdpg_ufkl", "qwen3_4b_grpo", "qwen3_4b_rlsd", "qwen3_4b_opcd",
        "qwen3_4b_sdpg_no_distill", "qwen3_4b_sdpg_no_anchor", "qwen3_1.7b_sdpg", "qwen3_1.7b_sdpg_lora_1gpu",
        "demo_cpu",
    }  # fmt: skip
    assert set(ACCELERATE_CONFIGS) >= {"single_gpu", "multi_gpu", "zero2", "zero3", "fsdp2"}
    assert not (RECIPES / "accelerate").exists()  # no copies of TRL's configs


@pytest.mark.parametrize("path", TRAINING_RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_and_every_key_is_used(path):
    # The demo recipe leaves the model to the demo, which converts it first.
    extra = ("--model_name_or_path", "local/model") if path.stem == "demo_cpu" else ()
    script_args, training_args, model_args = _parse(path, *extra)
    assert isinstance(script_args, SDPGScriptArguments) and isinstance(training_args, SDPGConfig)
    # Each YAML key lands, with its value, on exactly one of the dataclasses (YAML lists stay lists).
    for key, value in yaml.safe_load(path.read_text()).items():
        owners = [obj for obj in (script_args, training_args, model_args) if hasattr(obj, key)]
        assert owners, f"{path.name}: key {key!r} is not a field of the script's dataclasses"
        parsed = getattr(owners[0], key)
        if key == "report_to":  # transformers normalises "none" to []
            parsed, value = parsed or "none", value if value != ["none"] else "none"
        assert parsed == value or str(parsed) == str(value), f"{path.name}: {key} parsed as {parsed!r}"
    assert training_args.loss_type == "dapo"


def test_paper_recipes_follow_spec_4():
    _, urkl, model = _parse(RECIPES / "qwen3_4b_sdpg_urkl.yaml")
    _, ufkl, _ = _parse(RECIPES / "qwen3_4b_sdpg_ufkl.yaml")
    _, grpo, _ = _parse(RECIPES / "qwen3_4b_grpo.yaml")
    assert model.model_name_or_path == "Qwen/Qwen3-4B"
    assert (urkl.kl_estimator, ufkl.kl_estimator, grpo.kl_estimator) == ("urkl", "ufkl", "k3")
    assert (urkl.distill_coef, urkl.beta, grpo.distill_coef, grpo.beta) == (1e-3, 1e-3, 0.0, 1e-3)
    assert (urkl.distill_warmup_steps, urkl.distill_decay_steps, urkl.max_steps) == (50, 350, 400)
    assert (urkl.learning_rate, urkl.weight_decay, urkl.warmup_steps, urkl.max_grad_norm) == (1e-6, 0.1, 10, 1.0)
    assert (urkl.num_generations, urkl.temperature, urkl.max_completion_length) == (8, 1.0, 4096)
    # 128 prompts x 8 responses per optimiser step on 8 GPUs, one update per generation batch.
    assert urkl.per_device_train_batch_size * 8 * urkl.gradient_accumulation_steps == 128 * 8
    assert urkl.use_vllm and urkl.vllm_mode == "colocate" and urkl.bf16
    _, lora, lora_model = _parse(RECIPES / "qwen3_1.7b_sdpg_lora_1gpu.yaml")
    assert lora_model.use_peft and lora_model.lora_r == 16 and lora.bf16


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_recipes_report_only_to_what_the_core_install_has(path):
    recipe = yaml.safe_load(path.read_text())
    for settings in [recipe.get("train", recipe), *(recipe.get("methods") or {}).values()]:
        assert settings.get("report_to", "none") == "none", path.name  # `report_to: [wandb]` needs `pip install wandb`
    if "train" not in recipe:  # a training recipe: it needs no package beyond the core install and its extras
        extra = ("--model_name_or_path", "local/model") if path.stem == "demo_cpu" else ()
        missing = _parse(path, *extra)[1].missing_packages()
        assert all(line.startswith("use_vllm=True") for line in missing), missing


def test_demo_recipe_trains_in_float32_and_evaluates_the_final_model():
    script, demo, _ = _parse(RECIPES / "demo_cpu.yaml", "--model_name_or_path", "local/model")
    # GRPOConfig defaults to bf16, which a CPU without native bf16 emulates: 283 s per demo step instead of 25 s.
    assert demo.bf16 is False and demo.use_cpu and not demo.gradient_checkpointing
    assert script.eval_every_steps and demo.max_steps % script.eval_every_steps == 0


def test_unknown_recipe_keys_are_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((RECIPES / "demo_cpu.yaml").read_text() + "\ndistil_coef: 0.1\n")  # typo of distill_coef
    with pytest.raises(ValueError, match="distil_coef"):
        _parse(bad, "--model_name_or_path", "local/model")


@pytest.mark.parametrize("name", ["multi_gpu", "zero2", "zero3", "fsdp2"])
def test_the_accelerate_configs_the_docs_name_load(name):
    config = load_config_from_file(str(recipes.recipe_path(name)))
    expected = {"multi_gpu": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp2": "FSDP"}[name]
    assert str(config.distributed_type).split(".")[-1] == expected
    if name.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
    if name == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2


def test_fsdp2_config_saves_full_weights():
    # transformers' Trainer.save_model under FSDP writes weights only for a FULL_STATE_DICT; a sharded one leaves no
    # model.safetensors at the end of the run.
    config = load_config_from_file(str(recipes.recipe_path("fsdp2")))
    state_dict_type = config.fsdp_config["fsdp_state_dict_type"]
    assert state_dict_type == "FULL_STATE_DICT" and state_dict_type in FSDP2_STATE_DICT_TYPE


def test_accelerate_rejects_unknown_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipes.recipe_path("multi_gpu").read_text() + "num_proceses: 4\n")
    with pytest.raises(ValueError, match="num_proceses"):
        load_config_from_file(str(bad))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_has_a_paper_recipe_that_applies_its_preset(method):
    path = RECIPES / f"qwen3_4b_{method}.yaml"
    _, args, model = _parse(path)
    assert args.method == method and model.model_name_or_path == "Qwen/Qwen3-4B"
    written = yaml.safe_load(path.read_text())
    preset = METHODS[method]
    for field, value in {**preset.defines, **preset.fills}.items():  # what the recipe writes wins over a fill
        assert getattr(args, field) == written.get(field, value), (method, field)
    # the paper's shared setup (SPEC 4) is the same in every method's recipe
    assert (args.learning_rate, args.max_steps, args.num_generations, args.max_completion_length) == (
        1e-6,
        400,
        8,
        4096,
    )


def test_recipes_ship_inside_the_package_and_the_checkout_links_to_them():
    package = Path(recipes.__file__).resolve().parents[1]
    assert RECIPES == package / "recipes"
    checkout = Path(__file__).resolve().parents[1] / "recipes"  # the repository's top-level folder, a link
    if checkout.exists():  # not in an sdist
        assert checkout.resolve() == RECIPES.resolve()


def test_sdpg_recipes_lists_and_locates_every_recipe(capsys):
    names = list(recipes.list_recipes())
    training = sorted(p.stem for p in RECIPES.glob("*.yaml"))
    assert names == training + [f"accelerate/{name}" for name in sorted(ACCELERATE_CONFIGS)]  # training first

    assert recipes.main(["list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == names
    assert "The CPU demo" in listed[names.index("demo_cpu")]  # each recipe's first comment line describes it
    assert "TRL's accelerate config" in listed[names.index("accelerate/zero2")]

    for name, expected in [("demo_cpu", RECIPES / "demo_cpu.yaml"),
                           ("accelerate/zero2.yaml", ACCELERATE_CONFIGS["zero2"])]:  # fmt: skip
        assert recipes.main(["path", name]) == 0
        assert Path(capsys.readouterr().out.strip()) == expected
    assert recipes.main(["path"]) == 0
    assert Path(capsys.readouterr().out.strip()) == RECIPES

    assert recipes.main(["path", "demo_gpu"]) == 2
    err = capsys.readouterr().err
    assert "No shipped recipe named 'demo_gpu'" in err and "demo_cpu" in err


def test_demo_defaults_to_the_shipped_recipe_and_takes_a_recipe_name():
    assert demo.DEFAULT_RECIPE == recipes.recipe_path("demo_cpu") == RECIPES / "demo_cpu.yaml"
    with pytest.raises(FileNotFoundError, match="No shipped recipe named 'no_such_recipe'"):
        demo.main(["--config", "no_such_recipe"])


def test_every_recipe_the_docs_and_docstrings_name_exists():
    """`sdpg-evaluate`'s docstring once named a recipe that was never shipped; every `recipes/...yaml` a script's
    docstring (its --help), a comment, the README or the docs name must be one."""
    root = RECIPES.parents[1]
    texts = [
        *RECIPES.parent.rglob("*.py"),
        *RECIPES.rglob("*.yaml"),
        root / "README.md",
        *(root / "docs").glob("*.md"),
    ]
    named = {
        (path.name, match) for path in texts for match in re.findall(r"recipes/([\w./-]+?\.yaml)", path.read_text())
    }
    assert {name for _, name in named} >= {"qwen3_4b_sdpg_urkl.yaml", "demo_cpu.yaml"}  # the scan finds them
    missing = sorted((where, name) for where, name in named if not (RECIPES / name).is_file())
    assert not missing, f"recipes named but not shipped: {missing}"
