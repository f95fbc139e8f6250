"""Defaults that fit a GPU (issue 21, point 6): the in-training evaluation's generate batches are sized from the model
and the generation settings, and the teacher prompt cap follows the student's own sequence limit."""

from __future__ import annotations

import pytest
import torch
import trl.trainer.grpo_trainer
from conftest import make_model
from test_evaluate import problems  # noqa: F401 - a fixture
from test_notebook import NOTEBOOK, code_cells
from test_recipes import RECIPES, _parse
from test_trainer import make_trainer
from transformers import GPT2Config, Qwen3Config

import sdpg_trl
import sdpg_trl.config
import sdpg_trl.evaluation
from sdpg_trl.evaluation import (
    GENERATION_KV_CACHE_BYTES,
    evaluate_mean_at_k,
    generation_batch_size,
    prompt_token_ids,
)
from sdpg_trl.teacher import default_teacher_prompt_length

# Qwen/Qwen3-4B's config.json (the recipes' model), without its weights.
QWEN3_4B = Qwen3Config(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
)  # fmt: skip


def kv_bytes(config, dtype: torch.dtype, tokens: int) -> int:
    """The KV cache of one sequence, written out: keys and values, per layer, per key-value head, per token."""
    kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype.itemsize * tokens


@pytest.mark.parametrize(
    ("config", "dtype"),
    [(QWEN3_4B, torch.bfloat16), (QWEN3_4B, torch.float32), (GPT2Config(n_layer=12, n_head=12), torch.float16)],
    ids=["qwen3-4b-bf16", "qwen3-4b-fp32", "gpt2-fp16"],
)  # fmt: skip
def test_generation_batch_size_is_the_most_sequences_whose_kv_cache_fits(config, dtype):
    for prompt_length, new_tokens in [(0, 4096), (200, 4096), (512, 2048), (30000, 10000)]:
        size = generation_batch_size(config, dtype, prompt_length, new_tokens)
        per_sequence = kv_bytes(config, dtype, prompt_length + new_tokens)
        assert size == max(1, GENERATION_KV_CACHE_BYTES // per_sequence)
        assert size == 1 or size * per_sequence <= GENERATION_KV_CACHE_BYTES < (size + 1) * per_sequence


def test_the_4b_evaluation_fits_beside_training_where_64_sequences_did_not():
    """The Qwen3-4B recipes evaluate 4,096 new tokens per sample: 64 sequences held about 40 GB of KV cache."""
    _, args, _ = _parse(RECIPES / "qwen3_4b_sdpg_urkl.yaml")
    script, *_ = _parse(RECIPES / "qwen3_4b_sdpg_urkl.yaml")
    assert script.eval_generation_batch_size is None and script.eval_max_new_tokens == 4096
    size = generation_batch_size(QWEN3_4B, torch.bfloat16, 200, script.eval_max_new_tokens)
    assert size == 13 and size * kv_bytes(QWEN3_4B, torch.bfloat16, 4296) < 8 * 2**30
    assert 64 * kv_bytes(QWEN3_4B, torch.bfloat16, 4296) > 40e9


def test_evaluation_sizes_its_generate_calls_by_default(tokenizer, problems, monkeypatch):  # noqa: F811
    """Without `batch_size`, `model.generate` gets as many sequences as fit the KV-cache budget (here made room for
    exactly 5 of the longest prompt), not a fixed 64."""
    model = make_model(tokenizer)
    new_tokens = 4
    longest = max(len(prompt_token_ids(tokenizer, p["prompt"])) for p in problems)
    budget = 5 * kv_bytes(model.config, torch.float32, longest + new_tokens)
    monkeypatch.setattr(sdpg_trl.evaluation, "GENERATION_KV_CACHE_BYTES", budget + 1)
    sizes = []
    generate = model.generate
    model.generate = lambda input_ids, **kwargs: sizes.append(len(input_ids)) or generate(input_ids, **kwargs)
    evaluate_mean_at_k(model, tokenizer, problems, k=4, max_new_tokens=new_tokens, progress=False)
    assert sum(sizes) == 3 * 4 and max(sizes) == 5, sizes


# ---------------------------------------------------------------------------------------------------------------------
# The teacher prompt cap: the student's sequence limit
# ---------------------------------------------------------------------------------------------------------------------
def test_default_teacher_prompt_cap_is_the_students_sequence_limit_within_the_positions():
    assert default_teacher_prompt_length(40960, 4096, 6144) == 6144  # 2,048 of student prompt + 4,096 of context
    assert default_teacher_prompt_length(40960, 4096, None) == 40960 - 4096  # transformers generation: positions
    assert default_teacher_prompt_length(512, 6, 1000) == 512 - 6  # never past the positions
    assert default_teacher_prompt_length(None, 6, 300) == 300 and default_teacher_prompt_length(None, 6) is None
    with pytest.raises(ValueError, match="max_completion_length \\(512\\) leaves no room"):
        default_teacher_prompt_length(512, 512, 6144)


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("qwen3_4b_*.yaml")))
def test_4b_recipes_cap_the_teacher_prompt_at_the_students_limit(name):
    """36,864 tokens before (the positions left after the completion); now room for the student's longest prompt
    and a context as long as its longest completion."""
    _, args, _ = _parse(RECIPES / name)
    assert args.use_vllm and args.max_teacher_prompt_length is None
    cap = default_teacher_prompt_length(QWEN3_4B.max_position_embeddings, args.max_completion_length,
                                        args.vllm_max_model_length)  # fmt: skip
    student_prompt = args.vllm_max_model_length - args.max_completion_length
    assert cap == 6144 == student_prompt + args.max_completion_length


def test_trainer_caps_teacher_prompts_at_vllms_sequence_limit(tmp_path, tokenizer, tiny_model_dir, monkeypatch):
    """With vLLM generating (its engine faked here: vLLM is not installed) the default cap is its
    `vllm_max_model_length`, not the 506 positions the tiny model has left after 6 completion tokens."""
    engines = []
    monkeypatch.setattr(trl.trainer.grpo_trainer, "VLLMGeneration", lambda **kwargs: engines.append(kwargs))
    installed = sdpg_trl.config.is_installed
    monkeypatch.setattr(sdpg_trl.config, "is_installed", lambda module: module == "vllm" or installed(module))
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, use_vllm=True, vllm_mode="colocate",
                           vllm_max_model_length=300)  # fmt: skip
    assert engines[0]["max_model_length"] == 300
    assert trainer._max_teacher_prompt_length == 300


# ---------------------------------------------------------------------------------------------------------------------
# The notebook picks the device
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cuda", [False, True])
def test_notebook_trains_on_the_gpu_in_bf16_when_there_is_one(tiny_model_dir, monkeypatch, cuda):
    """The imports and configuration cells, run as a kernel would with CUDA reported available or not: the config
    they build (recorded; a bf16 config cannot be built without a GPU) trains on the GPU in bf16, else on the CPU in
    float32 (before: `use_cpu=True, bf16=False` whatever the machine)."""
    monkeypatch.setenv("SDPG_NOTEBOOK_MODEL", tiny_model_dir)
    monkeypatch.setenv("SDPG_NOTEBOOK_SMOKE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    configs = []
    monkeypatch.setattr(sdpg_trl, "SDPGConfig", lambda **kwargs: configs.append(kwargs))
    cells = code_cells()
    last = next(i for i, source in enumerate(cells) if "args = SDPGConfig(" in source)
    namespace: dict = {}
    for source in cells[1 : last + 1]:  # after the install cell, up to the configuration
        exec(compile(source, str(NOTEBOOK), "exec"), namespace)
    assert namespace["DEVICE"] == ("cuda" if cuda else "cpu")
    assert configs[0]["bf16"] is cuda and configs[0]["use_cpu"] is not cuda
