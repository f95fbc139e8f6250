"""Shared fixtures: a tiny random-weight Llama and a word-level tokenizer built locally (no Hub access)."""

from __future__ import annotations

import os

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

pytest_plugins = ["pytester"]  # tests/test_markers.py runs pytest on the GPU tests

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
WORDS = (
    "what is plus minus times the answer correct hint solve rigorous reasoning final put in boxed a way to this"
    " step by show your work privileged for you only out it yourself different route than if can do not"
    " mention that were given problem sum of and equals : . , ? { } \\ ( ) - + = * / ---"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' </s> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace/punctuation word-level tokenizer over digits and a few words, with a chat template."""
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS + [str(d) for d in range(10)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False, **overrides,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def make_dataset(n: int = 4) -> Dataset:
    rows = [
        {
            "prompt": [{"role": "user", "content": f"what is {i} plus {i + 1} ?"}],
            "privileged_context": f"the answer is {2 * i + 1} .",
            "answer": str(2 * i + 1),
        }
        for i in range(n)
    ]
    return Dataset.from_list(rows)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped where CUDA is not available (setup.cfg also deselects them by default)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False); see `make gpu-check`")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> str:
    """A saved tiny checkpoint, so code that loads models by path is exercised the way it loads Hub ids."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
