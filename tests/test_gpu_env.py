"""`make gpu-check`'s offline path, on CPU: the Python it is given, completed from a folder of wheels with
`--no-index`, collects the GPU tests (which skip without CUDA); and `make gpu-wheels` leaves out torch, transformers
and what they bring."""

from __future__ import annotations

import importlib.metadata
import os
import re
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bench.gpu_env import requirements, unmet, wheels_to_download

REPO = Path(__file__).resolve().parent.parent
# What an offline GPU machine with torch and transformers typically lacks; pure-Python packages, so that this test can
# rebuild their wheels from the installed copies without the network.
MISSING = ("trl", "datasets", "math-verify", "latex2sympy2_extended")


def test_gpu_wheels_leave_out_torch_transformers_their_dependencies_and_what_the_target_has():
    report = {"install": [
        {"metadata": {"name": name, "version": "1.0", "requires_dist": deps}} for name, deps in [
            ("torch", ["filelock", "nvidia-cublas-cu12; platform_system == 'Linux'"]), ("filelock", []),
            ("nvidia-cublas-cu12", []), ("transformers", ["huggingface-hub>=1.0", "tokenizers"]),
            ("huggingface_hub", ["filelock"]), ("tokenizers", []), ("trl", ["accelerate", "datasets", "transformers"]),
            ("accelerate", ["torch", "psutil"]), ("psutil", []), ("datasets", ["pyarrow", "filelock"]),
            ("pyarrow", []), ("Math_Verify", []), ("pytest", []),
        ]
    ]}  # fmt: skip
    assert wheels_to_download(report, have=set()) == [
        "accelerate==1.0", "datasets==1.0", "Math_Verify==1.0", "psutil==1.0", "pyarrow==1.0", "pytest==1.0",
        "trl==1.0",
    ]  # fmt: skip
    assert wheels_to_download(report, have={"PyArrow", "pytest"}) == [
        "accelerate==1.0", "datasets==1.0", "Math_Verify==1.0", "psutil==1.0", "trl==1.0",
    ]  # fmt: skip


def _wheel_of_installed(name: str, folder: Path) -> Path:
    """The wheel of an installed pure-Python distribution, rebuilt from its files (as pip would have unpacked it)."""
    dist = importlib.metadata.distribution(name)
    files = [f for f in dist.files if ".." not in f.parts and "__pycache__" not in f.parts
             and f.name not in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")]  # fmt: skip
    info = next(f.parts[0] for f in files if f.parts[0].endswith(".dist-info"))
    wheel = folder / f"{info.removesuffix('.dist-info')}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for f in files:
            archive.write(dist.locate_file(f), str(f))
        archive.writestr(f"{info}/RECORD", "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n")
    return wheel


@pytest.mark.wheel
def test_gpu_check_completes_a_given_python_offline_and_collects_the_gpu_tests(tmp_path):
    """A fresh Python that has torch, transformers and everything else but TRL, datasets and math-verify: the
    install step takes exactly those from the wheel folder, with `--no-index`, and the GPU tests then collect and
    skip (no CUDA here). gpu-check itself builds no venv and runs the benchmark in bf16."""
    fresh = tmp_path / "python"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", fresh], check=True)
    python = fresh / "bin" / "python"
    # The "given" packages (pip among them): this environment's, seen through a .pth file, without the missing ones
    # or this package.
    given = tmp_path / "given"
    given.mkdir()
    left_out = re.compile(
        r"(trl|datasets|math_verify|latex2sympy2_extended|sdpg_trl)([-.].*)?$"
        r"|__editable__.*|.*\.pth|__pycache__",
        re.IGNORECASE,
    )
    (packages,) = [Path(p) for p in site.getsitepackages() if Path(p).name == "site-packages"][:1]
    for entry in packages.iterdir():
        if not left_out.fullmatch(entry.name):
            (given / entry.name).symlink_to(entry)
    fresh_site = next((fresh / "lib").glob("python3*/site-packages"))
    (fresh_site / "given.pth").write_text(f"{given}\n")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in MISSING:
        _wheel_of_installed(name, wheels)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))} | {"PIP_NO_INDEX": "1"}
    run = dict(cwd=REPO, env=env, capture_output=True, text=True)
    install = subprocess.run([python, "-m", "bench.gpu_env", "install", "--wheels", wheels, "--allow-cpu-torch"],
                             **run)  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    installed = {m.lower().replace("_", "-") for m in re.findall(r"Successfully installed (.*)", install.stdout)[0]
                 .split()}  # fmt: skip
    assert {re.sub(r"-[\d.]+$", "", m) for m in installed} == {n.lower().replace("_", "-") for n in MISSING}
    where = subprocess.run([python, "-c", "import trl, datasets, math_verify; print(trl.__file__)"], **run)
    assert where.stdout.startswith(str(fresh_site)), where.stdout + where.stderr
    # Nothing is left to install: a second run is a no-op.
    again = subprocess.run([python, "-m", "bench.gpu_env", "install", "--wheels", wheels, "--allow-cpu-torch"], **run)
    assert "nothing to install" in again.stdout

    tests = subprocess.run([python, "-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider",
                            "tests/test_gpu.py"], **run)  # fmt: skip
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-3000:]
    skipped = int(re.search(r"(\d+) skipped", tests.stdout).group(1))
    assert skipped >= 6 and "needs a CUDA GPU" in tests.stdout and "passed" not in tests.stdout

    recipe = subprocess.run(["make", "-n", "gpu-check", f"GPU_PYTHON={python}"], **run).stdout
    assert "venv" not in recipe and "--bf16" in recipe and f"{python} -m pytest" in recipe


def test_the_requirements_gpu_check_installs_are_setup_cfgs():
    names = {r.name for r in requirements()}
    assert {"torch", "transformers", "trl", "datasets", "math-verify", "pytest"} <= names
    assert unmet(requirements()) == []  # this environment has them all
