"""The LoRA quickstart notebook runs top to bottom (tiny model, two steps), so it cannot rot silently; and the
committed copy keeps the outputs of its real run, since readers see it on the web before running it."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import sdpg_trl.rewards

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "sdpg_quickstart.ipynb"
SDPG_METRICS = ("sdpg/distill_coef", "sdpg/gate_ratio", "sdpg/distill_kl", "kl", "reward", "entropy")


def code_cells() -> list[str]:
    return [
        "".join(cell["source"]) for cell in json.loads(NOTEBOOK.read_text())["cells"] if cell["cell_type"] == "code"
    ]


def digit_count_reward(completions, answer=None, **kwargs) -> list[float]:
    """Stands in for the verifier, which the random tiny model never satisfies: with all-equal rewards there is no
    advantage, no gate and no gradient, the adapter would stay at zero and the reload check would prove nothing."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(sum(ch.isdigit() for ch in text)) for text in texts]


@pytest.fixture(scope="module")
def executed(tiny_model_dir, tmp_path_factory) -> tuple[dict, Path]:
    """Every code cell, in order, in one namespace, as a kernel would run them (the install cell is a no-op here:
    sdpg_trl is importable)."""
    matplotlib.use("Agg")
    workdir = tmp_path_factory.mktemp("notebook")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SDPG_NOTEBOOK_MODEL", tiny_model_dir)
        patch.setenv("SDPG_NOTEBOOK_SMOKE", "1")
        patch.chdir(workdir)
        patch.setattr(sdpg_trl.rewards, "lenient_math_accuracy_reward", digit_count_reward)
        namespace: dict = {}
        for source in code_cells():
            exec(compile(source, str(NOTEBOOK), "exec"), namespace)
    matplotlib.pyplot.close("all")
    return namespace, workdir


def test_notebook_trains_and_logs_sdpg_metrics(executed):
    ns, _ = executed
    assert ns["SMOKE"] and ns["STEPS"] == 2
    assert [log["step"] for log in ns["logs"]] == [1, 2]
    for log in ns["logs"]:
        assert all(log.get(key) is not None for key in SDPG_METRICS), log
    # The rewards vary within groups, so rollouts were gated and distilled: the SDPG term really ran.
    assert max(log["sdpg/gate_ratio"] for log in ns["logs"]) > 0
    assert max(log["sdpg/distill_kl"] for log in ns["logs"]) > 0
    assert [log["step"] for log in ns["evals"]] == [0, 1, 2]  # held-out mean@k before training and at each step
    assert ns["views"]["headroom"]["samples"] == 4 * 4  # 4 problems x 4 samples per view
    assert {"student", "teacher"} <= ns["views"].keys()
    assert len(ns["before"]) == len(ns["after"]) == 3


def test_notebook_adapter_is_saved_alone_and_reloads_with_identical_logits(executed, tiny_model_dir):
    ns, workdir = executed
    adapter = workdir / ns["adapter_dir"]
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert not (adapter / "model.safetensors").exists()  # LoRA: the base weights are not copied
    # The adapter moved the model (else "identical logits" would hold for any adapter, even an empty one) ...
    assert ns["adapter_effect"] > 0
    assert ns["reload_diff"] == 0
    # ... and, independently of the notebook's own check, a fresh reload from disk reproduces the trained logits.
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter)).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**ns["batch"]).logits, ns["trainer"].model(**ns["batch"]).logits)


def test_committed_notebook_keeps_the_outputs_of_its_real_run():
    cells = [cell for cell in json.loads(NOTEBOOK.read_text())["cells"] if cell["cell_type"] == "code"]
    outputs = [out for cell in cells[1:] for out in cell["outputs"]]  # every cell after the (skipped) install cell
    # Run top to bottom in one kernel, not stitched together from partial runs.
    assert [cell["execution_count"] for cell in cells] == list(range(1, len(cells) + 1))
    text = "".join(
        "".join(out.get("text", "")) + "".join(out.get("data", {}).get("text/plain", "")) for out in outputs
    )
    assert "SmolLM2-135M-Instruct".lower() in text.lower()  # the demo model, not the tests' tiny one
    assert "teacher view" in text and "The reloaded adapter gives identical logits." in text
    assert any("image/png" in out.get("data", {}) for out in outputs)  # the curves
    assert not any(out["output_type"] == "error" for out in outputs)
