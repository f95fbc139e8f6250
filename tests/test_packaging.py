"""What setup.cfg promises holds: Python and TRL versions, extras that exist, a core install without plotting."""

from __future__ import annotations

import configparser
import importlib.metadata
import subprocess
import sys
import types
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from sdpg_trl import _trl_compat
from sdpg_trl.scripts import train as train_script

ROOT = Path(__file__).resolve().parents[1]


def setup_cfg() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return config


def _lines(value: str) -> list[str]:
    return [line.strip() for line in value.splitlines() if line.strip() and not line.strip().startswith("#")]


def requirements() -> dict[str, list[Requirement]]:
    """`install_requires` under the key "", and each extra under its name."""
    config = setup_cfg()
    found = {"": [Requirement(line) for line in _lines(config["options"]["install_requires"])]}
    for extra, value in config["options.extras_require"].items():
        found[extra] = [Requirement(line) for line in _lines(value)]
    return found


def test_python_floor_is_trls_and_the_classifiers_agree():
    config = setup_cfg()
    ours = SpecifierSet(config["options"]["python_requires"])
    trl = SpecifierSet(importlib.metadata.metadata("trl")["Requires-Python"])
    assert str(ours) == str(trl) == ">=3.11"
    versions = [c.rsplit("::", 1)[1].strip() for c in _lines(config["metadata"]["classifiers"])
                if c.startswith("Programming Language :: Python :: 3.")]  # fmt: skip
    assert versions and all(v in ours for v in versions), versions
    trl_classifiers = importlib.metadata.metadata("trl").get_all("Classifier")
    assert all(f"Programming Language :: Python :: {v}" in trl_classifiers for v in versions)
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in versions  # the one the tests run on


def test_trl_range_is_the_tested_one_and_admits_the_installed_trl():
    (trl,) = [r for r in requirements()[""] if r.name == "trl"]
    assert str(trl.specifier) == _trl_compat.SUPPORTED_TRL
    assert importlib.metadata.version("trl") in trl.specifier
    assert _trl_compat.TESTED_TRL == importlib.metadata.version("trl"), "update TESTED_TRL after testing a new TRL"
    assert "1.17.0" not in trl.specifier  # internals may move in a minor release: widened only after testing


def test_every_requested_extra_is_declared_by_its_package():
    # pip only warns (and installs nothing extra) for an extra a package does not declare, e.g. math-verify 0.9 and
    # `antlr4_13_2`. pip before 23.3 compares the names without normalising them, so the spelling must match too.
    for extra, reqs in requirements().items():
        for req in reqs:
            if not req.extras or canonicalize_name(req.name) == "sdpg-trl":
                continue
            declared = set(importlib.metadata.metadata(req.name).get_all("Provides-Extra") or [])
            assert req.extras <= declared, f"[{extra}] {req}: {req.name} declares {sorted(declared)}"


def test_vllm_and_deepspeed_extras_delegate_to_trl_and_plotting_is_optional():
    reqs = requirements()
    assert [str(r) for r in reqs["vllm"]] == ["trl[vllm]"]
    assert [str(r) for r in reqs["deepspeed"]] == ["trl[deepspeed]"]
    core = {canonicalize_name(r.name) for r in reqs[""]}
    assert "matplotlib" not in core and "gguf" not in core
    assert [r.name for r in reqs["plots"]] == ["matplotlib"]
    assert "sdpg-trl[plots]" in [str(r) for r in reqs["demo"]]


def test_the_core_import_path_does_not_need_matplotlib():
    # matplotlib is made unimportable; the package, the trainer and the CLI entry points must still import, and only
    # drawing a plot asks for the `plots` extra.
    code = """
import sys
class NoMatplotlib:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib' (blocked by the test)")
sys.meta_path.insert(0, NoMatplotlib())
import sdpg_trl, sdpg_trl.trainer, sdpg_trl.losses, sdpg_trl.data, sdpg_trl.evaluation, sdpg_trl.rewards
import sdpg_trl.scripts.train, sdpg_trl.scripts.evaluate, sdpg_trl.scripts.demo
import sdpg_trl.compare
from sdpg_trl.plotting import pyplot
try:
    pyplot()
except ImportError as err:
    print(err)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "pip install 'sdpg-trl[plots]'" in out.stdout


def test_train_script_ends_the_run_without_trainer_end(monkeypatch):
    # `Trainer.end` is new in transformers 5.18; on older versions the script calls what it wraps.
    ended = []
    trainer = types.SimpleNamespace(accelerator=types.SimpleNamespace(end_training=lambda: ended.append("accelerator")))
    monkeypatch.setattr(train_script, "train", lambda *args: trainer)
    monkeypatch.setattr(train_script, "make_parser", lambda: types.SimpleNamespace(parse_args_and_config=lambda args: ()))
    train_script.main([])
    assert ended == ["accelerator"]
    trainer.end = lambda: ended.append("trainer")
    train_script.main([])
    assert ended == ["accelerator", "trainer"]
