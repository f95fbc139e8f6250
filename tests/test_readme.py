"""What the README states about defaults, presets and accepted fields is what the code does (issue 23, section 6):
its tables are read and compared with the dataclasses and the presets, and a GRPO option it calls refused or not
implemented must be refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from trl import GRPOConfig

from sdpg_trl import SDPGConfig
from sdpg_trl.config import METHODS
from sdpg_trl.losses import LOSS_TYPES

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def table(header: str) -> list[list[str]]:
    """The body rows of the README table whose header row starts with `header`, as lists of cells."""
    lines = README.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def value(text: str):
    """A value as the README writes it in backticks: a number, `null`, `true`/`True`, or text."""
    try:
        return float(text)
    except ValueError:
        return yaml.safe_load(text)


def settings(cell: str) -> dict:
    return {name: value(text) for name, text in re.findall(r"`(\w+): ([^`]+)`", cell)}


def test_the_method_table_is_the_presets():
    rows = table("| `method` |")
    assert {re.match(r"`(\w+)`", row[0]).group(1) for row in rows} == set(METHODS)
    for name, _, defines, fills in rows:
        method = re.match(r"`(\w+)`", name).group(1)
        preset = METHODS[method]
        assert settings(defines) == dict(preset.defines), method
        assert set(re.findall(r"`(\w+) > 0`", defines)) == set(preset.positive), method
        assert settings(fills) == dict(preset.fills), method


def test_the_defaults_table_is_the_dataclasses_defaults():
    rows = table("| field | `SDPGConfig` | `GRPOConfig` |")
    assert rows
    for name, ours, trls, _ in rows:
        field = re.match(r"`(\w+)`", name).group(1)
        assert value(ours.strip("`")) == SDPGConfig.__dataclass_fields__[field].default, field
        if trls == "—":
            assert field not in GRPOConfig.__dataclass_fields__, field
        else:
            assert value(trls.strip("`")) == GRPOConfig.__dataclass_fields__[field].default, field


def test_the_loss_types_the_readme_lists_are_the_accepted_ones():
    listed = re.search(r"`loss_type` \(((?:`\w+`,? ?)+)\)", README).group(1)
    assert set(re.findall(r"`(\w+)`", listed)) == set(LOSS_TYPES)


# GRPOConfig's own options (not TrainingArguments', not SDPG's) that no preset defines: each is accepted alone.
GRPO_OPTIONS = {
    name for name in GRPOConfig.__dict__["__annotations__"]
    if name not in SDPGConfig.__dict__["__annotations__"] and not any(name in p.defines for p in METHODS.values())
}  # fmt: skip


def test_a_grpo_option_the_readme_calls_refused_or_unimplemented_is_refused(tmp_path):
    sentences = re.split(r"(?<=[.;])\s+|\n-", README)
    claims = {
        name
        for sentence in sentences
        if re.search(r"refuse|not implemented|not supported", sentence)
        for name in re.findall(r"`(\w+)`", sentence)
        if name in GRPO_OPTIONS
    }
    for name in claims:
        default = GRPOConfig.__dataclass_fields__[name].default
        other = (not default) if isinstance(default, bool) else None
        if other is None and isinstance(default, (int, float)):
            other = default + 0.01 if isinstance(default, float) else default + 1
        if other is None:
            continue
        with pytest.raises((ValueError, TypeError, NotImplementedError)):
            SDPGConfig(str(tmp_path), use_cpu=True, **{name: other})
