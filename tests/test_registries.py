"""Issue 24: an anchor estimator and an outcome loss type are each declared once, in a registry (`losses.py`); the
config's allowed values, its errors, `--help`, docs/ALGORITHM.md and the resume check read them from there."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
from test_trainer import make_args

from sdpg_trl.checkpoints import loss_shaping_fields
from sdpg_trl.config import SDPGConfig
from sdpg_trl.losses import ANCHOR_ESTIMATORS, LOSS_TYPES, anchor_per_token, policy_token_weights
from sdpg_trl.parser import SDPGParser

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def _reads(names: tuple[str, ...]) -> str:
    return ", ".join(f"`{name}`" for name in names) or "—"


def _table_rows(text: str, first_header: str) -> list[str]:
    """The body rows of the markdown table whose header starts with `first_header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def test_algorithm_doc_lists_exactly_the_registered_variants():
    text = (DOCS / "ALGORITHM.md").read_text()
    estimators = [f"| `{e.name}` | {e.formula} | {_reads(e.reads)} |" for e in ANCHOR_ESTIMATORS.values()]
    assert _table_rows(text, "`kl_estimator`") == estimators
    loss_types = [
        f"| `{t.name}` | {t.formula} | {t.aggregation.description} | {_reads(t.reads)} |" for t in LOSS_TYPES.values()
    ]
    assert _table_rows(text, "`loss_type`") == loss_types


def test_config_errors_and_help_list_the_registered_names(tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"must be one of {tuple(ANCHOR_ESTIMATORS)}")):
        make_args(tmp_path, kl_estimator="nope")
    with pytest.raises(ValueError, match=re.escape(f"must be one of {tuple(LOSS_TYPES)}")):
        make_args(tmp_path, loss_type="nope")
    with pytest.raises(ValueError, match="Unknown kl_estimator 'nope'; expected one of 'k3', 'urkl'"):
        anchor_per_token(torch.zeros(1, 1), torch.zeros(1, 1), "nope")
    with pytest.raises(ValueError, match="Unknown loss_type 'nope'; expected one of 'grpo', 'bnpo'"):
        policy_token_weights(torch.ones(1, 1), "nope", token_normalizer=1.0)
    help_text = SDPGParser(SDPGConfig).format_help()
    assert "{" + ",".join(ANCHOR_ESTIMATORS) + "}" in help_text
    assert "{" + ",".join(LOSS_TYPES) + "}" in help_text


def test_resume_fields_include_every_field_a_registered_variant_reads():
    fields = set(loss_shaping_fields())
    for entry in (*LOSS_TYPES.values(), *ANCHOR_ESTIMATORS.values()):
        assert set(entry.reads) <= fields, entry.name
    assert {"sapo_temperature_pos", "vespo_k_pos", "max_completion_length"} <= fields
