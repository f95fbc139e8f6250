"""The Python `make gpu-check` runs in: the one it is given, completed offline from a folder of wheels.

GPU machines are often offline and come with their own CUDA build of PyTorch. `make gpu-check` runs in that Python
(`GPU_PYTHON=...`) when it has a CUDA torch and transformers in the ranges setup.cfg allows, and installs only what is
missing (TRL, datasets, math-verify, pytest and their dependencies) from a folder of wheels, with `--no-index`. The
folder is written beforehand on a networked machine by `make gpu-wheels`, for the target's Python version and platform
and without torch or anything the target's torch and transformers already bring.

    python bench/gpu_env.py download --dest gpu-wheels [--python-version 3.11 --platform manylinux_2_28_x86_64]
        [--have target-freeze.txt]                 # networked machine: what the target will miss, as wheels
    python bench/gpu_env.py install --wheels gpu-wheels   # the target (offline): check torch, install what misses

The package itself is not installed: gpu-check runs from the repository root, which is on `sys.path`.
"""

from __future__ import annotations

import argparse
import configparser
import importlib.metadata
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
#: What the target Python must already have: a CUDA build of torch, and transformers (both from setup.cfg's ranges).
GIVEN = ("torch", "transformers")


def requirements(repo: Path = REPO) -> list[Requirement]:
    """setup.cfg's `install_requires`, and its `test` extra's pytest: what gpu-check imports."""
    config = configparser.ConfigParser()
    config.read(repo / "setup.cfg")

    def lines(value: str) -> list[Requirement]:
        return [Requirement(line.strip()) for line in value.splitlines() if line.strip() and line.strip()[0] != "#"]

    tests = [r for r in lines(config["options.extras_require"]["test"]) if r.name == "pytest"]
    return lines(config["options"]["install_requires"]) + tests


def unmet(reqs: list[Requirement]) -> list[Requirement]:
    """The requirements this Python does not satisfy (absent, or a version outside the range)."""
    missing = []
    for req in reqs:
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(req)
            continue
        if not req.specifier.contains(version, prereleases=True):
            missing.append(req)
    return missing


def check_given(reqs: list[Requirement], require_cuda: bool = True) -> dict[str, str]:
    """The versions of the given torch and transformers; a SystemExit naming what is wrong otherwise."""
    by_name = {canonicalize_name(r.name): r for r in reqs}
    problems = [f"{r} (setup.cfg): {_installed(r.name)}" for r in unmet([by_name[name] for name in GIVEN])]
    if require_cuda and not problems:
        import torch

        if torch.version.cuda is None:
            problems.append(f"torch {torch.__version__} is not a CUDA build")
    if problems:
        sys.exit(
            f"gpu-check needs a Python with a CUDA build of torch and with transformers, in setup.cfg's ranges; "
            f"{sys.executable} has: " + "; ".join(problems) + ". Give it another with GPU_PYTHON=/path/to/python."
        )
    return {name: importlib.metadata.version(name) for name in GIVEN}


def _installed(name: str) -> str:
    try:
        return f"{name} {importlib.metadata.version(name)} installed"
    except importlib.metadata.PackageNotFoundError:
        return f"{name} not installed"


def install(wheels: Path, require_cuda: bool = True) -> list[str]:
    """Install what this Python misses from `wheels`, offline, with torch and transformers pinned to the given ones
    (pip then cannot replace them). Returns the requirements installed."""
    reqs = requirements()
    given = check_given(reqs, require_cuda)
    missing = [str(r) for r in unmet(reqs)]
    if not missing:
        print("gpu-check: nothing to install, every requirement is met")
        return []
    if not wheels.is_dir():
        sys.exit(f"gpu-check: {', '.join(missing)} missing, and there is no wheel folder {wheels} (`make gpu-wheels`)")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pins:
        pins.write("".join(f"{name}=={version}\n" for name, version in given.items()))
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), "-c", pins.name]
    print("gpu-check: installing", ", ".join(missing), "from", wheels, flush=True)
    subprocess.run([*cmd, *missing], check=True)
    return missing


def wheels_to_download(report: dict, have: set[str]) -> list[str]:
    """`name==version` of each package of a `pip install --report` resolution that the target lacks: not in `have`
    (its `pip freeze`, when known) and not torch, transformers or anything they depend on (their dependency closure
    within the resolution), which the target has with them."""
    installs = {canonicalize_name(i["metadata"]["name"]): i["metadata"] for i in report["install"]}
    given, todo = set(), [canonicalize_name(name) for name in GIVEN]
    while todo:
        name = todo.pop()
        if name in given or name not in installs:
            continue
        given.add(name)
        todo += [canonicalize_name(Requirement(r).name) for r in installs[name].get("requires_dist", [])]
    keep = sorted(set(installs) - given - {canonicalize_name(h) for h in have})
    return [f"{installs[name]['name']}=={installs[name]['version']}" for name in keep]


def download(dest: Path, python_version: str | None, platforms: list[str], have_file: Path | None) -> list[str]:
    """Resolve the requirements for the target (pinned to its `pip freeze` when given) and download, as wheels, the
    packages it lacks. Needs the network."""
    target = ["--only-binary=:all:"]
    if python_version:
        target += ["--python-version", python_version, "--implementation", "cp"]
    for platform in platforms:
        target += ["--platform", platform]
    have = {}
    if have_file is not None:
        have = {Requirement(line).name: line for line in have_file.read_text().split() if "==" in line}
    pip = [sys.executable, "-m", "pip"]
    with tempfile.TemporaryDirectory() as tmp:
        report_path, pins = Path(tmp) / "report.json", Path(tmp) / "pins.txt"
        pins.write_text("".join(f"{line}\n" for line in have.values()))
        subprocess.run(
            [
                *pip,
                "install",
                "--dry-run",
                "--ignore-installed",
                "--quiet",
                "--report",
                report_path,
                "--target",
                Path(tmp) / "target",
                "-c",
                pins,
                *target,
                *map(str, requirements()),
            ],
            check=True,
        )
        names = wheels_to_download(json.loads(report_path.read_text()), set(have))
    if names:
        subprocess.run([*pip, "download", "--no-deps", "--dest", dest, *target, *names], check=True)
    print(f"gpu-wheels: {len(names)} wheels in {dest}: {', '.join(names)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("download", help="on a networked machine: write the wheel folder")
    get.add_argument("--dest", type=Path, required=True)
    get.add_argument("--python-version", help="the target's, e.g. 3.11 (default: this Python's)")
    get.add_argument("--platform", action="append", default=[], help="the target's pip platform tag (repeatable)")
    get.add_argument("--have", type=Path, help="the target's `pip freeze`: those packages are not downloaded")
    put = commands.add_parser("install", help="on the target: check torch, install what is missing, offline")
    put.add_argument("--wheels", type=Path, required=True)
    put.add_argument("--allow-cpu-torch", action="store_true", help="accept a CPU build of torch (tests only)")
    args = parser.parse_args()
    if args.command == "download":
        download(args.dest, args.python_version, args.platform, args.have)
    else:
        install(args.wheels, require_cuda=not args.allow_cpu_torch)


if __name__ == "__main__":
    main()
