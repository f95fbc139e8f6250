"""Every TRL name sdpg-trl uses that is not TRL's public API, imported here and nowhere else.

TRL may move or rename its internals in any minor release. Importing them in one module, under names of our own,
means that a TRL that moved one fails at `import sdpg_trl` with an ImportError naming the installed TRL and the one
tested, instead of a NameError or a wrong result deep in a training step; and `tests/test_trl_compat.py` checks each
one's signature, so that a TRL upgrade fails loudly in one place. To support a new TRL: run that test file, adapt
the names here, and widen `trl` in setup.cfg together with `SUPPORTED_TRL` below.

What is here:
- TRL's vocabulary-tile kernel helpers (`head_kernels.py`): the chunked log-prob autograd function, its tile width
  and tile folds, the compute dtype under autocast, the fp32 accumulating GEMM, and the ZeRO-3 LM-head gather.
- Model and trainer helpers (`trainer.py`, `evaluation.py`) from `trl.models.utils` and `trl.trainer.utils`.
- TRL's EMA-teacher callbacks, which live in `trl.experimental.sdpo` and are loaded on first use: TRL may drop an
  experimental package without deprecation, and then only `teacher_model_kind="ema"` should stop working.
- GRPOTrainer's static loss helpers (`losses.py`, `trainer.py`): the off-policy sequence mask and VESPO's weight.
- The `GRPOTrainer` internals `SDPGTrainer` overrides, calls or reads: `GRPO_OVERRIDES`, `GRPO_METHODS`,
  `GRPO_ATTRIBUTES`, and `tokenize_prompts`, a call to the private `GRPOTrainer._tokenize_prompts`.
- `vllm_generate`: sampling with GRPOTrainer's vLLM engine (`trainer.vllm_generation`, a `VLLMGeneration`) at other
  settings than the rollouts', for the in-training evaluation (`evaluation.py`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from typing import Any

import torch

# The TRL the test suite ran against, and the range setup.cfg allows (tests/test_packaging.py keeps them equal).
TESTED_TRL = "1.16.0"
SUPPORTED_TRL = "~=1.16.0"


def installed_trl_version() -> str:
    try:
        return importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _load(module: str, name: str) -> Any:
    """`module.name` (dotted: a class attribute), or an ImportError that names the installed and the tested TRL."""
    try:
        return functools.reduce(getattr, name.split("."), importlib.import_module(module))
    except (ImportError, AttributeError) as err:
        raise ImportError(
            f"sdpg-trl needs `{module}.{name}` from TRL, which could not be imported from the installed trl "
            f"{installed_trl_version()} ({type(err).__name__}: {err}). sdpg-trl is tested with trl {TESTED_TRL} and "
            f"supports trl{SUPPORTED_TRL}: install that (pip install 'trl{SUPPORTED_TRL}'), or an sdpg-trl release "
            f"made for trl {installed_trl_version()}."
        ) from err


# --- Vocabulary-tile kernels (trl.kernels) -------------------------------------------------------------------------
# `ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping,
# logit_scale, outputs)`: log-probs (with grad) and optional entropy, one vocabulary tile at a time. Exported by
# `trl.kernels`, but its positional arguments are an internal contract, so it is checked here too.
ChunkedLogProbFunction = _load("trl.kernels", "ChunkedLogProbFunction")
# `compute_dtype(hidden) -> torch.dtype`: the autocast dtype when autocast is on, else the hidden states' dtype.
compute_dtype = _load("trl.kernels.chunked_divergence", "_compute_dtype")
# The vocabulary tile width of TRL's fused LM head, with which GRPOTrainer scores the old, reference and training
# log-probs: a token's log-prob depends on the tile boundaries (the online log-sum-exp), so sdpg-trl's kernels use it.
LOGPROB_VOCAB_TILE = _load("trl.trainer.utils", "_CHUNKED_LOGPROB_CHUNK_SIZE")
# Tokens per tile of `ChunkedLogProbFunction`: its tile, `LOGPROB_TOKEN_CHUNK x LOGPROB_VOCAB_TILE` in the compute
# dtype, is the transient memory GRPO's LM head takes, the budget of sdpg-trl's own tiles.
LOGPROB_TOKEN_CHUNK = _load("trl.kernels.chunked_logprob", "TOKEN_CHUNK_SIZE")
# The tile folds of `ChunkedLogProbFunction`, Triton kernels on CUDA/XPU (`use_triton(device)`) and torch otherwise:
# `logprob_forward_kernel[(n,)](...)` / `logprob_forward_tile(...)` fold one logits tile `(n, n_cols)` in the compute
# dtype into running online-log-sum-exp statistics; `logprob_backward_kernel[(n, blocks)](...)` /
# `logprob_backward_tile(...)` overwrite a recomputed tile with the gradient of the log-probs and entropies. Sharing
# them is what makes a token's log-prob the same bits in every kernel (`head_kernels.py`).
logprob_forward_kernel = _load("trl.kernels.chunked_logprob", "_forward_kernel")
logprob_forward_tile = _load("trl.kernels.chunked_logprob", "_forward_tile")
logprob_backward_kernel = _load("trl.kernels.chunked_logprob", "_backward_kernel")
logprob_backward_tile = _load("trl.kernels.chunked_logprob", "_backward_tile")
use_triton = _load("trl.kernels.chunked_logprob", "_use_triton")
LOGPROB_BLOCK_SIZE = _load("trl.kernels.chunked_logprob", "_BLOCK_SIZE")
# `addmm_fp32(acc, a, b)`: `acc += a @ b` into an fp32 `acc`, without rounding `a @ b` to the inputs' dtype.
addmm_fp32 = _load("trl.kernels.chunked_logprob", "_addmm_fp32")
# `maybe_gather_lm_head_ctx(*params)`: gathers ZeRO-3-partitioned LM-head parameters; a no-op context otherwise.
maybe_gather_lm_head_ctx = _load("trl.trainer.utils", "maybe_gather_lm_head_ctx")

# --- Model and trainer helpers (trl.models.utils, trl.trainer.utils) -----------------------------------------------
# `unwrap_model_for_generation(model, accelerator, gather_deepspeed3_params, ...)`: context yielding a model to
# `generate` with (ZeRO-3 shards gathered, gradient checkpointing off).
unwrap_model_for_generation = _load("trl.models.utils", "unwrap_model_for_generation")
# `prepare_deepspeed(model, accelerator)` / `prepare_fsdp(model, accelerator)`: wrap a frozen model for inference.
prepare_deepspeed = _load("trl.models.utils", "prepare_deepspeed")
prepare_fsdp = _load("trl.models.utils", "prepare_fsdp")
# `pad(tensors, padding_value, padding_side, pad_to_multiple_of)`: stack 1-D tensors into one padded batch.
pad = _load("trl.trainer.utils", "pad")
# `create_model_from_path(model_id, architecture=None, **kwargs)`: how GRPOTrainer loads its reference model.
create_model_from_path = _load("trl.trainer.utils", "create_model_from_path")
# `get_config_model_id(config) -> str`: the Hub id or path a model was loaded from.
get_config_model_id = _load("trl.trainer.utils", "get_config_model_id")
# `use_adapter(model, adapter_name)`: context running a PEFT model with another adapter (None: adapters off).
use_adapter = _load("trl.trainer.utils", "use_adapter")
# `ForwardRedirection()(wrapper_module, original_module, method, *args, **kwargs)`: runs `method(*args, **kwargs)`
# inside `wrapper_module`'s forward (DDP, DeepSpeed or FSDP around `original_module`), as TRL's distillation trainer
# runs its chunked head: there the wrappers prepare the backward and ZeRO-3 routes the head's gradient.
ForwardRedirection = _load("trl.models.utils", "_ForwardRedirection")

# --- GRPOTrainer's static loss helpers (pure functions on tensors) -------------------------------------------------
# `off_policy_sequence_mask(advantages, per_token_logps, sampling_per_token_logps, mask, off_policy_threshold)`:
# DeepSeek-V3.2's off-policy sequence mask, `(B, 1)`: 0 for a sequence with a negative advantage whose mean
# `log pi_sampler - log pi_theta` exceeds the threshold, 1 otherwise.
off_policy_sequence_mask = _load("trl.trainer.grpo_trainer", "GRPOTrainer.get_off_policy_mask")
# `vespo_gamma_weights(advantages, log_ratio_per_token, mask, importance_sampling_ratio, k_pos, lambda_pos, k_neg,
# lambda_neg)`: VESPO's detached gamma weight `phi(w)` of the sequence ratio, `(B, 1)`.
vespo_gamma_weights = _load("trl.trainer.grpo_trainer", "GRPOTrainer.get_gamma_weights")

# --- EMA-teacher callbacks (trl.experimental.sdpo), loaded on first use --------------------------------------------
# `PEFTAdapterEMACallback(model, teacher_adapter_name, update_rate, sync_steps, accelerator)` (its teacher adapter
# created without drawing from the global generators, `_keeping_the_global_rng`),
# `SyncTeacherModelCallback(teacher_model, accelerator)`, `is_pure_lora_training(model, accelerator=None)`.
_LAZY = {
    "PEFTAdapterEMACallback": "trl.experimental.sdpo.teacher_sync",
    "SyncTeacherModelCallback": "trl.experimental.sdpo.teacher_sync",
    "is_pure_lora_training": "trl.experimental.sdpo.teacher_sync",
}


def _keeping_the_global_rng(callback: type) -> type:
    """TRL's `PEFTAdapterEMACallback` with its teacher adapter created without drawing from the global generators.

    PEFT's `add_adapter` draws the new adapter's LoRA initialisation (which TRL then zeroes) from torch's global
    generators, so an `ema` run's rollouts would differ from a `live` run's on the same seed; under `fork_rng` the
    generators are left as they were, and teacher kinds compare on the same rollouts.
    """
    _load(_LAZY["PEFTAdapterEMACallback"], "PEFTAdapterEMACallback._initialize_teacher_adapter")

    class PEFTAdapterEMACallback(callback):
        def _initialize_teacher_adapter(self) -> None:
            with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
                super()._initialize_teacher_adapter()

    return PEFTAdapterEMACallback


def __getattr__(name: str) -> Any:  # PEP 562: `from sdpg_trl._trl_compat import SyncTeacherModelCallback`
    if name in _LAZY:
        value = _load(_LAZY[name], name)
        if name == "PEFTAdapterEMACallback":
            value = _keeping_the_global_rng(value)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- GRPOTrainer internals -----------------------------------------------------------------------------------------
# Private methods SDPGTrainer overrides, with the parameters it expects them to have.
GRPO_OVERRIDES = {
    "_generate_and_score_completions": ("self", "inputs"),
    "_calculate_rewards": ("self", "inputs", "prompts", "completions", "completion_ids_list"),
    "_save_checkpoint": ("self", "model", "trial"),
    "_load_optimizer_and_scheduler": ("self", "checkpoint"),
    "_get_grad_norm": ("self", "model", "grad_norm"),  # transformers.Trainer's: the norm before clipping
}
# Methods SDPGTrainer calls on itself, with their parameters. `get_high_entropy_mask(entropies, mask, threshold)`:
# the tokens whose entropy is at or above the `threshold` quantile of every process's tokens (top_entropy_quantile).
GRPO_METHODS = {"get_high_entropy_mask": ("self", "entropies", "mask", "threshold")}
# Attributes GRPOTrainer (or transformers' Trainer) sets in `__init__` that SDPGTrainer reads.
GRPO_ATTRIBUTES = (
    "_tokenizer",
    "_metrics",
    "pad_to_multiple_of",
    "beta",
    "ref_model",
    "temperature",
    "eos_token_ids",
    "aux_loss_enabled",
    "router_aux_loss_coef",
    "is_deepspeed_enabled",
    "is_fsdp_enabled",
)


def tokenize_prompts(trainer: Any, prompts: list) -> tuple[list[list[int]], list | None, dict[str, Any]]:
    """`GRPOTrainer._tokenize_prompts`: GRPO's own prompt tokenisation (chat template, tools, multimodal fields).

    Returns `(prompt_ids, images, multimodal_fields)`: one list of token ids per prompt, the images found in
    conversational prompts (None without any), and the processor's extra fields for vision-language models.
    """
    return trainer._tokenize_prompts(prompts)


# `VLLMGeneration`'s sampling settings, constructor arguments that it keeps under the same names and reads on every
# `generate` call; `vllm_generate` swaps them for the evaluation's and back.
VLLM_SAMPLING_ATTRIBUTES = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "max_completion_length",
    "generation_kwargs",
)


def vllm_generate(
    trainer: Any,
    prompt_ids: list[list[int]],
    num_generations: int,
    *,
    temperature: float,
    top_p: float,
    max_tokens: int,
) -> list[list[int]]:
    """`num_generations` completions (token ids, prompt-major) of each prompt from GRPOTrainer's vLLM engine, colocate
    or server mode, sampled at these settings instead of the rollouts' (no top-k, min-p, repetition penalty or extra
    generation kwargs).

    As `GRPOTrainer._generate_single_turn` does before a rollout, the engine first gets the policy's current weights
    unless it has this step's already. Every process must call it with as many prompts (server mode gathers them).
    """
    engine = trainer.vllm_generation
    if trainer.state.global_step != trainer._last_loaded_step:
        engine.sync_weights()
        trainer._last_loaded_step = trainer.state.global_step
    saved = {name: getattr(engine, name) for name in VLLM_SAMPLING_ATTRIBUTES}
    settings = dict(
        temperature=temperature,
        top_p=top_p,
        top_k=0,
        min_p=0.0,
        repetition_penalty=1.0,
        max_completion_length=max_tokens,
        generation_kwargs={},
    )
    try:
        for name, value in settings.items():
            setattr(engine, name, value)
        # Each prompt repeated, as GRPO's rollout batches are: server mode samples every `num_generations`-th prompt
        # `num_generations` times, colocate mode each entry once.
        repeated = [ids for ids in prompt_ids for _ in range(num_generations)]
        _, completion_ids, _, _ = engine.generate(prompts=repeated, images=None, num_generations=num_generations)
    finally:
        for name, value in saved.items():
            setattr(engine, name, value)
    return [list(ids) for ids in completion_ids]


# --- TRL's command line (trl.scripts.grpo, trl.cli, trl.accelerate_configs) ----------------------------------------
# `GRPOScriptArguments`: the script arguments `trl grpo` parses (TRL's `ScriptArguments` plus `reward_funcs` and
# `reward_model_name_or_path`); `sdpg-train`'s are a subclass, so a field TRL adds there is accepted here too.
GRPOScriptArguments = _load("trl.scripts.grpo", "GRPOScriptArguments")
# `resolve_accelerate_config_argument(launch_args) -> launch_args`: `--accelerate_config NAME|PATH` as `trl`'s CLI
# reads it, a file or the name of a config TRL ships (`TRL_ACCELERATE_CONFIGS`), turned into `--config_file PATH`.
resolve_accelerate_config_argument = _load("trl.cli.accelerate_config", "resolve_accelerate_config_argument")
# The package whose `<name>.yaml` files are those configs (zero2, zero3, fsdp2, multi_gpu, ...).
TRL_ACCELERATE_CONFIGS = "trl.accelerate_configs"


# The eager names; the lazy ones (`_LAZY`) are left out so that `import *` does not import `trl.experimental.sdpo`.
__all__ = [
    "ChunkedLogProbFunction",
    "ForwardRedirection",
    "GRPO_ATTRIBUTES",
    "GRPO_METHODS",
    "GRPO_OVERRIDES",
    "SUPPORTED_TRL",
    "TESTED_TRL",
    "VLLM_SAMPLING_ATTRIBUTES",
    "addmm_fp32",
    "compute_dtype",
    "create_model_from_path",
    "get_config_model_id",
    "installed_trl_version",
    "maybe_gather_lm_head_ctx",
    "off_policy_sequence_mask",
    "pad",
    "prepare_deepspeed",
    "prepare_fsdp",
    "tokenize_prompts",
    "unwrap_model_for_generation",
    "use_adapter",
    "vespo_gamma_weights",
    "vllm_generate",
]
__all__ += ["GRPOScriptArguments", "TRL_ACCELERATE_CONFIGS", "resolve_accelerate_config_argument"]
__all__ += [
    "LOGPROB_BLOCK_SIZE",
    "LOGPROB_TOKEN_CHUNK",
    "LOGPROB_VOCAB_TILE",
    "logprob_backward_kernel",
    "logprob_backward_tile",
    "logprob_forward_kernel",
    "logprob_forward_tile",
    "use_triton",
]
