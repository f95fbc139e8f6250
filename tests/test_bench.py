"""Smoke test of the benchmark harness: every method runs one tiny update and the report renders.

Timing is never asserted (that is the benchmark's job, not the suite's); this only keeps `bench/` from rotting.
"""

import pytest

from bench.loss_step import METHODS, measure
from bench.report import write_report


@pytest.fixture(scope="module")
def results():
    return [measure(m, vocab=1024, length=8, batch_size=2, iters=1, warmup=1) | {"kind": "loss_step"} for m in METHODS]


def test_every_method_runs_one_update(results):
    for r in results:
        assert r["median_s"] > 0 and r["peak_gib"] > 0, r


def test_report_renders_ratios_and_plot(results, tmp_path):
    doc = tmp_path / "PERFORMANCE.md"
    write_report(results, mem_limit_gib=16.0, doc=doc)
    text = doc.read_text()
    assert "SDPGTrainer (chunked)" in text and "1.00x" in text
    assert (tmp_path / "performance.png").stat().st_size > 0


def test_the_gpu_check_benchmark_runs_grpo_and_sdpg_in_bf16(monkeypatch):
    """`make gpu-check` measures what users run (`--bf16`): SDPG's head kernels project in bf16 there."""
    import torch

    import sdpg_trl.head_kernels

    seen, compute_dtype = [], sdpg_trl.head_kernels._compute_dtype
    monkeypatch.setattr(sdpg_trl.head_kernels, "_compute_dtype", lambda h: seen.append(compute_dtype(h)) or seen[-1])
    for method in ("grpo", "sdpg"):
        result = measure(method, vocab=1024, length=8, batch_size=2, iters=1, warmup=1, bf16=True)
        assert result["precision"] == "bf16" and result["median_s"] > 0, result
    assert seen and set(seen) == {torch.bfloat16}


def test_the_head_memory_table_is_the_codes():
    """docs/PERFORMANCE.md's LM-head memory table is what bench/head_memory.py computes from the code's constants now
    (a changed chunk default or TRL tile changes it: rerun `python -m bench.head_memory --write-doc`)."""
    from bench import head_memory
    from sdpg_trl._trl_compat import LOGPROB_TOKEN_CHUNK, LOGPROB_VOCAB_TILE
    from sdpg_trl.head_kernels import TOKEN_CHUNK, VOCAB_TILE, chunk_transient_bytes

    text = head_memory.DOC.read_text()
    block = text.split(head_memory.BEGIN)[1].split(head_memory.END)[0].strip()
    assert block == head_memory.render(), "rerun `python -m bench.head_memory --write-doc`"
    scale = head_memory.Scale()
    assert (scale.vocab, scale.hidden, scale.tokens) == (151936, 2560, 8 * 4096)
    sdpg_tiles = head_memory.sdpg(scale, False)["tiles"]
    assert sdpg_tiles == chunk_transient_bytes(TOKEN_CHUNK) == TOKEN_CHUNK * VOCAB_TILE * (2 * 2 + 3 * 4)
    assert head_memory.trl_grpo(scale, False)["tiles"] == LOGPROB_TOKEN_CHUNK * LOGPROB_VOCAB_TILE * 2
    rows = head_memory.table(scale)
    assert rows["paper's code (full logits), at least"]["lora"] >= 18.5 * 2**30  # two bf16 (8, 4096, 151936) tensors
    full_grad = scale.vocab * scale.hidden * (4 + 2)  # fp32 accumulator and bf16 copy, once per micro-batch
    for name, row in rows.items():
        if "paper" not in name:
            assert row["full"] - row["lora"] == full_grad, name
