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
