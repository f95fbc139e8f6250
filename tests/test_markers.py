"""The `gpu` marker: the GPU tests are left out of the default run, and `pytest -m gpu` skips them without CUDA."""

from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def run_gpu_tests(pytester, *args: str):
    """pytest on tests/test_gpu.py with the project's configuration (setup.cfg), in this process."""
    config = ("-c", str(REPO / "setup.cfg"), "--rootdir", str(REPO), "-p", "no:cacheprovider")
    return pytester.runpytest_inprocess(*config, str(REPO / "tests" / "test_gpu.py"), *args)


def test_gpu_tests_are_deselected_by_default_and_skipped_without_cuda(pytester, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA, wherever this runs
    default = run_gpu_tests(pytester)
    count = default.parseoutcomes()["deselected"]
    default.assert_outcomes(deselected=count)  # and nothing ran
    assert count >= 3

    selected = run_gpu_tests(pytester, "-m", "gpu", "-rs")
    selected.assert_outcomes(skipped=count)
    selected.stdout.fnmatch_lines(["*needs a CUDA GPU (torch.cuda.is_available() is False)*"])
