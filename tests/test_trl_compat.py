"""Every TRL internal sdpg-trl relies on resolves, with the parameters sdpg-trl calls it with.

These are the names in `sdpg_trl/_trl_compat.py`. When TRL is upgraded and one of them moved or changed, this file
fails first, naming the installed TRL and the one tested; fix the compat module, then widen `trl` in setup.cfg.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
from conftest import make_dataset
from trl import GRPOConfig, GRPOTrainer

from sdpg_trl import SDPGTrainer
from sdpg_trl import _trl_compat as compat

PACKAGE = Path(compat.__file__).resolve().parent
TRL = f"trl {compat.installed_trl_version()} (tested: {compat.TESTED_TRL})"

# Each internal -> its leading parameters, in the order sdpg-trl passes them (callables: their own parameters;
# classes: their constructor's; autograd functions: `forward`'s, which `.apply` takes positionally).
SIGNATURES = {
    "ChunkedLogProbFunction": ["ctx", "hidden", "weight", "bias", "targets", "temperature", "chunk_size",
                               "final_logit_softcapping", "logit_scale", "outputs"],
    "compute_dtype": ["hidden"],
    "logprob_forward_kernel": ["mm_ptr", "mm_stride", "targets_ptr", "max_ptr", "sum_exp_ptr", "x_sum_exp_ptr",
                               "sq_sum_exp_ptr", "z_sum_ptr", "max_before_target_ptr", "target_logit_ptr",
                               "vocab_start", "n_cols", "logit_scale", "softcap", "inv_t", "HAS_SOFTCAP",
                               "HAS_ENTROPY", "HAS_LOG_SUM_SQ_PROBS", "HAS_MEAN_LOGITS", "HAS_IS_TOP1", "BLOCK_SIZE"],
    "logprob_forward_tile": ["tile", "tile_stride", "targets", "running_max", "sum_exp", "x_sum_exp", "sq_sum_exp",
                             "z_sum", "max_before_target", "target_logit", "vocab_start", "n_cols", "logit_scale",
                             "softcap", "inv_t", "HAS_SOFTCAP", "HAS_ENTROPY", "HAS_LOG_SUM_SQ_PROBS",
                             "HAS_MEAN_LOGITS", "HAS_IS_TOP1", "BLOCK_SIZE"],
    "logprob_backward_kernel": ["mm_ptr", "mm_stride", "targets_ptr", "log_z_ptr", "entropy_ptr", "grad_logprobs_ptr",
                                "grad_entropy_ptr", "vocab_start", "n_cols", "logit_scale", "softcap", "inv_t",
                                "HAS_SOFTCAP", "HAS_LOGPROB_GRAD", "HAS_ENTROPY_GRAD", "BLOCK_SIZE"],
    "logprob_backward_tile": ["tile", "tile_stride", "targets", "log_z", "entropy", "grad_logprobs", "grad_entropy",
                              "vocab_start", "n_cols", "logit_scale", "softcap", "inv_t", "HAS_SOFTCAP",
                              "HAS_LOGPROB_GRAD", "HAS_ENTROPY_GRAD", "BLOCK_SIZE"],
    "use_triton": ["device"],
    "addmm_fp32": ["acc", "a", "b"],
    "maybe_gather_lm_head_ctx": ["params"],
    "unwrap_model_for_generation": ["model", "accelerator", "gather_deepspeed3_params"],
    "prepare_deepspeed": ["model", "accelerator"],
    "prepare_fsdp": ["model", "accelerator"],
    "pad": ["tensors", "padding_value", "padding_side", "pad_to_multiple_of"],
    "create_model_from_path": ["model_id", "architecture", "kwargs"],
    "get_config_model_id": ["config"],
    "use_adapter": ["model", "adapter_name"],
    "ForwardRedirection": [],  # constructed without arguments; its call is checked below
    "off_policy_sequence_mask": ["advantages", "per_token_logps", "sampling_per_token_logps", "mask",
                                 "off_policy_threshold"],
    "vespo_gamma_weights": ["advantages", "log_ratio_per_token", "mask", "importance_sampling_ratio", "k_pos",
                            "lambda_pos", "k_neg", "lambda_neg"],
    "PEFTAdapterEMACallback": ["model", "teacher_adapter_name", "update_rate", "sync_steps", "accelerator"],
    "SyncTeacherModelCallback": ["teacher_model", "accelerator"],
    "is_pure_lora_training": ["model", "accelerator"],
    # sdpg-train reads these of TRL's GRPO script arguments (its own are a subclass).
    "GRPOScriptArguments": ["dataset_name", "dataset_config", "dataset_train_split", "dataset_test_split",
                            "dataset_streaming", "ignore_bias_buffers", "reward_model_name_or_path", "reward_funcs"],
    "resolve_accelerate_config_argument": ["launch_args"],
}  # fmt: skip
CONSTANTS = {
    "GRPO_ATTRIBUTES", "GRPO_METHODS", "GRPO_OVERRIDES", "SUPPORTED_TRL", "TESTED_TRL", "VLLM_SAMPLING_ATTRIBUTES",
    "TRL_ACCELERATE_CONFIGS", "LOGPROB_BLOCK_SIZE", "LOGPROB_TOKEN_CHUNK", "LOGPROB_VOCAB_TILE",
}  # fmt: skip
# Defined in the compat module, checked below.
OWN_HELPERS = {"installed_trl_version", "tokenize_prompts", "vllm_generate"}


def _parameters(obj) -> list[str]:
    target = obj.forward if hasattr(obj, "apply") and hasattr(obj, "forward") else obj
    target = getattr(target, "fn", target)  # a Triton kernel (`triton.jit`, where Triton is installed): its function
    return list(inspect.signature(target).parameters)


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_trl_internal_resolves_with_the_parameters_sdpg_passes(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trl.experimental announces itself
        obj = getattr(compat, name)
    expected = SIGNATURES[name]
    actual = _parameters(obj)[: len(expected)]
    assert actual == expected, f"{name} ({obj.__module__}) changed its parameters in {TRL}: {actual} != {expected}"


def test_forward_redirection_is_called_with_the_wrapper_the_module_and_the_method():
    assert _parameters(compat.ForwardRedirection.__call__)[:4] == [
        "self",
        "wrapper_module",
        "original_module",
        "method",
    ]


def test_every_compat_name_is_checked():
    exported = set(compat.__all__) | set(compat._LAZY)
    assert exported - CONSTANTS - OWN_HELPERS == set(SIGNATURES), "add a signature for each new compat name"
    for name in compat.__all__:
        assert hasattr(compat, name), name


def test_a_moved_internal_fails_at_import_naming_both_trl_versions():
    with pytest.raises(ImportError) as err:
        compat._load("trl.kernels.chunked_logprob", "_a_helper_trl_removed")
    message = str(err.value)
    assert "trl.kernels.chunked_logprob._a_helper_trl_removed" in message
    assert compat.installed_trl_version() in message and compat.TESTED_TRL in message
    assert f"trl{compat.SUPPORTED_TRL}" in message
    with pytest.raises(ImportError, match="trl.no_such_module"):
        compat._load("trl.no_such_module", "anything")
    with pytest.raises(AttributeError):
        compat.not_a_compat_name  # noqa: B018


def test_importing_sdpg_trl_does_not_import_trls_experimental_sdpo():
    # The EMA-teacher callbacks are loaded on first use: if TRL drops its experimental SDPO package, only
    # `teacher_model_kind="ema"` stops working, not `import sdpg_trl`.
    code = (
        "import sys, sdpg_trl, sdpg_trl.scripts.train;"
        "print(any(m.startswith('trl.experimental.sdpo') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("name", sorted(compat.GRPO_OVERRIDES))
def test_overridden_grpo_methods_keep_their_parameters(name):
    expected = list(compat.GRPO_OVERRIDES[name])
    assert list(inspect.signature(getattr(GRPOTrainer, name)).parameters) == expected, f"GRPOTrainer.{name} in {TRL}"
    assert list(inspect.signature(getattr(SDPGTrainer, name)).parameters) == expected, f"SDPGTrainer.{name}"


@pytest.mark.parametrize("name", sorted(compat.GRPO_METHODS))
def test_called_grpo_methods_keep_their_parameters(name):
    expected = list(compat.GRPO_METHODS[name])
    assert list(inspect.signature(getattr(GRPOTrainer, name)).parameters) == expected, f"GRPOTrainer.{name} in {TRL}"


def test_grpo_trainer_sets_the_attributes_sdpg_reads_and_tokenizes_prompts(tmp_path, tokenizer, tiny_model_dir):
    args = GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=4,
        report_to="none", bf16=False, use_cpu=True,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=tiny_model_dir, reward_funcs=lambda completions, **kwargs: [0.0] * len(completions), args=args,
        train_dataset=make_dataset(), processing_class=tokenizer,
    )  # fmt: skip
    missing = [name for name in compat.GRPO_ATTRIBUTES if not hasattr(trainer, name)]
    assert not missing, f"GRPOTrainer in {TRL} no longer sets {missing}"

    prompts = [row["prompt"] for row in make_dataset(2)]
    prompt_ids, images, multimodal_fields = compat.tokenize_prompts(trainer, prompts)
    expected = [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        for p in prompts
    ]
    assert [list(ids) for ids in prompt_ids] == [list(ids) for ids in expected]
    assert images is None and not multimodal_fields


def test_grpo_trainers_vllm_engine_is_where_vllm_generate_reaches_for_it():
    """`vllm_generate` cannot run without vLLM; what it relies on is checked in TRL's source instead."""
    from trl.generation.vllm_generation import VLLMGeneration

    init = inspect.getsource(GRPOTrainer.__init__)
    assert "self.vllm_generation = VLLMGeneration(" in init and "self._last_loaded_step = -1" in init, TRL
    rollout = inspect.getsource(GRPOTrainer._generate_single_turn)
    assert "self.vllm_generation.sync_weights()" in rollout and "self._last_loaded_step" in rollout, TRL
    # The sampling settings are constructor arguments kept under their own names and read on every `generate`.
    parameters = inspect.signature(VLLMGeneration.__init__).parameters
    generate = inspect.getsource(VLLMGeneration.generate)
    for name in compat.VLLM_SAMPLING_ATTRIBUTES:
        assert name in parameters and f"self.{name}" in generate, f"VLLMGeneration.{name} in {TRL}"
    expected = ["self", "prompts", "images", "num_generations"]
    assert list(inspect.signature(VLLMGeneration.generate).parameters)[:4] == expected, TRL


def test_vllm_generate_samples_at_the_given_settings_and_restores_the_rollouts():
    class Engine:  # a VLLMGeneration's interface, without vLLM
        temperature, top_p, top_k, min_p, repetition_penalty = 0.7, 0.9, 5, 0.1, 1.2
        max_completion_length, generation_kwargs = 6, {"seed": 1}

        def __init__(self):
            self.synced, self.calls = 0, []

        def sync_weights(self):
            self.synced += 1

        def generate(self, prompts, images, num_generations):
            settings = {name: getattr(self, name) for name in compat.VLLM_SAMPLING_ATTRIBUTES}
            self.calls.append((prompts, images, num_generations, settings))
            return prompts, [[len(self.calls), i] for i in range(len(prompts))], None, None

    engine = Engine()
    step = types.SimpleNamespace(global_step=3)
    trainer = types.SimpleNamespace(vllm_generation=engine, _last_loaded_step=-1, state=step)
    completions = compat.vllm_generate(trainer, [[1, 2], [3]], 2, temperature=0.5, top_p=1.0, max_tokens=9)
    assert completions == [[1, 0], [1, 1], [1, 2], [1, 3]]  # two per prompt, prompt-major
    [(prompts, images, n, settings)] = engine.calls
    assert (prompts, images, n) == ([[1, 2], [1, 2], [3], [3]], None, 2)
    assert settings == dict(temperature=0.5, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0,
                            max_completion_length=9, generation_kwargs={})  # fmt: skip
    assert (engine.temperature, engine.top_k, engine.max_completion_length) == (0.7, 5, 6)  # the rollouts' again
    assert engine.synced == 1 and trainer._last_loaded_step == 3
    compat.vllm_generate(trainer, [[1]], 1, temperature=0.5, top_p=1.0, max_tokens=9)
    assert engine.synced == 1  # this step's weights are there already
    step.global_step = 4
    compat.vllm_generate(trainer, [[1]], 1, temperature=0.5, top_p=1.0, max_tokens=9)
    assert engine.synced == 2


# Modules of TRL that are its public API; anything else is imported through `_trl_compat`.
PUBLIC_TRL_MODULES = {"trl", "trl.rewards"}


def test_trl_internals_are_imported_only_through_the_compat_module():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_trl_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules, names = [node.module], [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                modules, names = [alias.name for alias in node.names], []
            else:
                continue
            for module in modules:
                if module.split(".")[0] != "trl":
                    continue
                if module not in PUBLIC_TRL_MODULES or any(name.startswith("_") for name in names):
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {module}")
    assert not offenders, "import these through sdpg_trl/_trl_compat.py:\n" + "\n".join(offenders)
