"""What `SDPGTrainer` checks before it loads anything: what a run would otherwise find out after minutes of model
loading, or never (a data set too small for one batch trains 0 steps and exits as if it had trained); and, once
GRPOTrainer loaded the model, what SDPG's loss cannot train (`check_loaded_model`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sized
from typing import Any

import torch
import yaml
from accelerate.utils import is_peft_model
from datasets import IterableDataset
from peft import PeftConfig
from transformers import AutoConfig, ProcessorMixin

from .config import SDPGConfig, is_installed
from .data import reading
from .teachers import TEACHER_KINDS

logger = logging.getLogger(__name__)

# LM-head output transforms TRL's fused head knows but SDPG's head kernels need passed explicitly; SDPG reads the two
# common ones (`hidden_states.LogitTransform`) and refuses the rest rather than distil from wrongly scaled logits.
_UNSUPPORTED_LOGIT_TRANSFORMS = ("output_multiplier", "lm_head_multiplier", "logits_scaling")

# What the error on a missing context column adds when `SDPGTrainer` was given no `args`.
DEFAULT_ARGS_NEED_CONTEXT = (
    "SDPGTrainer was given no args, so it uses the default SDPGConfig: SDPG with a privileged teacher (method "
    "'sdpg_urkl'), which reads each prompt's privileged context from that column. To train without a teacher, pass "
    "args=SDPGConfig(method='grpo'); otherwise add the column to the dataset, or name the column that holds the "
    "context with args=SDPGConfig(context_column=...)"
)


def looks_like_local_path(name: str) -> bool:
    """Whether a model name can only be a local path: absolute, `./`, `../` or `~`, or more than one `/` (a Hub id
    is `name` or `org/name`), or `folder/name` where `folder` is a local folder (`outputs/run`)."""
    if os.path.isabs(name) or name.startswith(("./", "../", "~")) or name in (".", "..") or name.count("/") > 1:
        return True
    return name.count("/") == 1 and os.path.isdir(name.split("/")[0])


def check_model_path(name: str) -> None:
    """Refuse a model name that is a local path (`looks_like_local_path`) to nothing, which transformers would take
    for a malformed Hub id or look up on the Hub."""
    if looks_like_local_path(name) and not os.path.exists(os.path.expanduser(name)):
        raise FileNotFoundError(
            f"The model path {name!r} does not exist. Give an existing model directory, or a Hub id ('name' or "
            "'org/name')."
        )


def check_model_source(model: Any, args: SDPGConfig, peft_config: PeftConfig | None) -> None:
    """Refuse a model GRPOTrainer could not load, or could not load the reference or teacher weights of.

    - A model path that looks local and does not exist (transformers would take it for a malformed Hub id).
    - A model object whose config names no checkpoint (`_name_or_path`, e.g. a model built from a config) while
      the run needs a second copy of its initial weights, which GRPOTrainer and SDPGTrainer load from that
      checkpoint: the reference model (`beta > 0`, no PEFT) or a `base`/`ema` teacher without PEFT.
    - A `peft_config` the teacher kind cannot train with (`Teacher.check_peft_config`: `ema` needs pure LoRA).
    """
    if args.needs_teacher:
        TEACHER_KINDS[args.teacher_model_kind].check_peft_config(peft_config)
    if isinstance(model, str):
        check_model_path(model)
        return
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    loadable = bool(source) and (not looks_like_local_path(source) or os.path.exists(os.path.expanduser(source)))
    if loadable or peft_config is not None or is_peft_model(model):  # with PEFT, the initial weights are adapter-off
        return
    needs = []
    if args.beta > 0:
        needs.append(f"beta={args.beta} needs a reference model")
    if args.needs_teacher and TEACHER_KINDS[args.teacher_model_kind].needs_initial_weights:
        needs.append(f"teacher_model_kind={args.teacher_model_kind!r} needs a copy of the initial weights")
    if needs:
        raise ValueError(
            f"SDPGTrainer got a model object whose config names no checkpoint to load from (_name_or_path "
            f"{source!r}), but {' and '.join(needs)}, which are loaded from that checkpoint. Save the model "
            "(model.save_pretrained(path)) and pass the path, or set beta=0.0 and teacher_model_kind='live'."
        )


def check_train_size(dataset: Any, args: SDPGConfig, name: str = "train_dataset") -> None:
    """Refuse a training set with fewer rows than one generation batch takes, which GRPO's sampler would drop
    whole: the run would take 0 steps and save the untrained model. Of a streamed set (no length) only the first
    rows are read, up to one generation batch. `name` is how the error names the set."""
    prompts = args.generation_batch_size // args.num_generations
    if isinstance(dataset, Sized):
        rows = len(dataset)
    elif isinstance(dataset, IterableDataset):
        with reading(name):
            rows = sum(1 for _ in dataset.take(prompts))
        name = f"{name} (streamed)"
    else:
        return
    if rows < prompts:
        raise ValueError(
            f"{name} has {rows} rows, fewer than one generation batch takes: {prompts} prompts "
            f"(generation_batch_size {args.generation_batch_size} / num_generations {args.num_generations}; "
            f"generation_batch_size = per_device_train_batch_size {args.per_device_train_batch_size} x "
            f"{args.world_size} processes x steps_per_generation {args.steps_per_generation}). It would train 0 "
            "steps. Give it more rows (e.g. a larger arithmetic_num_train), or lower per_device_train_batch_size or "
            "steps_per_generation."
        )


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls in hardware (AVX512-BF16 or AMX); elsewhere PyTorch emulates them."""
    # Private probes, read defensively: torch exposes no public query for this.
    probes = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", None),
        getattr(torch.cpu, "_is_amx_tile_supported", None),
    )
    return any(probe is not None and probe() for probe in probes)


def vision_language_signs(processing_class: Any, model_config: Any) -> list[str]:
    """What marks a model as vision-language, for SDPGTrainer to refuse it: an image processor in its processing class,
    a `vision_config` in its model config. Empty for a text-only model."""
    signs = []
    if isinstance(processing_class, ProcessorMixin) and getattr(processing_class, "image_processor", None) is not None:
        signs.append(f"its processing class {type(processing_class).__name__} has an image processor")
    if getattr(model_config, "vision_config", None) is not None:
        signs.append(f"its config {type(model_config).__name__} has a vision_config")
    return signs


def check_model_config(config: Any, processing_class: Any, args: SDPGConfig) -> Any:
    """Refuse what SDPG's loss cannot train (a vision-language model, an LM-head output transform the kernels do
    not apply) and return the model's text config. `config`: the model's config."""
    vision = vision_language_signs(processing_class, config)
    if vision:
        teacher = ", and the teacher prompts would be tokenised without their images" if args.needs_teacher else ""
        raise NotImplementedError(
            f"SDPGTrainer is text-only, and this is a vision-language model ({'; '.join(vision)}). Image inputs "
            "are not supported: SDPGTrainer's loss runs the student forward on token ids alone, so GRPO's image "
            f"inputs (pixel_values, image_grid_thw, ...) would be dropped{teacher}. Train vision-language models "
            "with trl.GRPOTrainer."
        )
    text_config = config.get_text_config()
    for name in _UNSUPPORTED_LOGIT_TRANSFORMS:
        if getattr(text_config, name, None) is not None:
            raise NotImplementedError(f"SDPGTrainer does not support models whose config sets {name!r}.")
    return text_config


def model_config_before_loading(model: Any, args: SDPGConfig) -> Any:
    """The config of `model` without loading its weights: a model object's own, a local checkpoint's `config.json`;
    None for a Hub id (reading it would need the network: the loaded model is checked instead)."""
    if not isinstance(model, str):
        return getattr(model, "config", None)
    path = os.path.expanduser(model)
    if not os.path.isfile(os.path.join(path, "config.json")):
        return None
    trust = (args.model_init_kwargs or {}).get("trust_remote_code", False)
    return AutoConfig.from_pretrained(path, trust_remote_code=trust)


def check_loaded_model(
    config: Any, processing_class: Any, args: SDPGConfig, device: torch.device, mixed_precision: str
) -> Any:
    """`check_model_config` on the loaded model, a warning about emulated bf16, and the model's text config.
    `config`: the CausalLM's config; `mixed_precision`: the accelerator's, the precision the run really has
    (`emulated_bf16_warning`)."""
    text_config = check_model_config(config, processing_class, args)
    if device.type == "cpu" and not cpu_has_native_bf16():
        # GRPOConfig turns bf16 on by default; emulated bf16 made a SmolLM2-135M step 11x slower (283 s vs 25 s).
        warning = emulated_bf16_warning(args, mixed_precision)
        if warning:
            logger.warning(warning)
    return text_config


def check_accelerate_config(launch_args: list[str]) -> None:
    """Refuse to launch with an accelerate config (`--config_file`, as `--accelerate_config` resolves to) that needs a
    package that is not installed, naming the extra that installs it: accelerate itself would say so only in every
    launched process, with its own install line."""
    if "--config_file" not in launch_args:
        return
    path = launch_args[launch_args.index("--config_file") + 1]
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if config.get("distributed_type") == "DEEPSPEED" and not is_installed("deepspeed"):
        raise ImportError(
            f"The accelerate config {path} runs DeepSpeed, and the deepspeed package is not installed: pip install "
            '"sdpg-trl[deepspeed]" (or choose a config without DeepSpeed, e.g. multi_gpu or fsdp2).'
        )


def emulated_bf16_warning(args: SDPGConfig, mixed_precision: str) -> str | None:
    """The warning for a run on a CPU without native bf16 whose effective precision (`mixed_precision`, the
    accelerator's) is bf16, naming the setting that turned it on; None when it is not bf16.

    bf16 comes from `bf16: true` (GRPOConfig's default), or, with `bf16: false`, from the accelerate config the run was
    launched with (`mixed_precision: bf16` in TRL's `multi_gpu`, `zero2`, ... configs), which `accelerate launch`
    passes as `ACCELERATE_MIXED_PRECISION` and transformers applies.
    """
    if mixed_precision != "bf16":
        return None
    if args.bf16:
        setting, fix = "SDPGConfig.bf16 is on", "Set bf16=False (`--bf16 false`) to train in float32."
    else:
        setting = (
            "bf16 is off, but the accelerate config this run was launched with sets mixed_precision: bf16 "
            f"(ACCELERATE_MIXED_PRECISION={os.environ.get('ACCELERATE_MIXED_PRECISION')!r}), so the run is bf16"
        )
        fix = "Launch with an accelerate config that sets mixed_precision: 'no' (or --mixed_precision no)."
    return (
        f"{setting}, but this CPU has no native bf16: autocast matmuls are emulated and training runs about 10x "
        f"slower. {fix}"
    )
