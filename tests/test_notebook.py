"""The notebook's code cells run top to bottom (on the tiny model, one step), so it cannot rot silently."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "sdpg_quickstart.ipynb"


def test_quickstart_notebook_runs(tiny_model_dir, monkeypatch, tmp_path):
    matplotlib.use("Agg")
    monkeypatch.setenv("SDPG_NOTEBOOK_MODEL", tiny_model_dir)
    monkeypatch.setenv("SDPG_NOTEBOOK_STEPS", "1")
    monkeypatch.chdir(tmp_path)
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    namespace: dict = {}
    for cell in cells:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), str(NOTEBOOK), "exec"), namespace)
    logs = namespace["logs"]
    assert len(logs) == 1 and "sdpg/opd_kl" in logs[0]
    assert (tmp_path / "outputs" / "notebook").is_dir()
