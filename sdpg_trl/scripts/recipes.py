"""The recipes shipped with sdpg-trl (`sdpg-train`, `sdpg-compare`), and TRL's accelerate configs by name.

    sdpg-recipes list                        # every recipe and accelerate config: name and what it is
    sdpg-recipes path demo_cpu               # absolute path of one (a name from `list`, `.yaml` optional)
    sdpg-recipes path zero3                  # TRL's accelerate config (also: accelerate/zero3)
    sdpg-recipes path                        # the folder of training recipes, to copy one and edit it

    sdpg-train --config "$(sdpg-recipes path qwen3_4b_sdpg_urkl)" --accelerate_config zero2
    accelerate launch --config_file "$(sdpg-recipes path zero2)" -m sdpg_trl.scripts.train \\
        --config "$(sdpg-recipes path qwen3_4b_sdpg_urkl)"

The training recipes are package data (`sdpg_trl/recipes/`), so an installed wheel has them; in a checkout of the
repository, `recipes/` is a link to the same folder, so the paths in the docs work there too. The accelerate configs
are TRL's own (`trl/accelerate_configs`: `zero1`, `zero2`, `zero3`, `fsdp1`, `fsdp2`, `multi_gpu`, `single_gpu`),
the files `trl grpo --accelerate_config NAME` and `sdpg-train --accelerate_config NAME` launch with.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from .._trl_compat import TRL_ACCELERATE_CONFIGS

ACCELERATE = "accelerate"  # the accelerate configs are listed as `accelerate/<name>`


def recipes_dir() -> Path:
    """The folder of shipped recipes inside the installed (or checked-out) package."""
    folder = resources.files("sdpg_trl") / "recipes"
    if not isinstance(folder, Path) or not folder.is_dir():  # installed unpacked, as pip does; not from a zip
        raise FileNotFoundError(f"sdpg-trl's recipes folder is missing at {folder}: reinstall sdpg-trl.")
    return folder


def accelerate_configs() -> dict[str, Path]:
    """Name -> path of every accelerate config TRL ships, the names `--accelerate_config` takes."""
    folder = resources.files(TRL_ACCELERATE_CONFIGS)
    return {Path(str(entry)).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def list_recipes() -> dict[str, Path]:
    """Name -> path of every shipped recipe (`demo_cpu`), then of TRL's accelerate configs (`accelerate/zero2`)."""
    folder = recipes_dir()
    training = {path.stem: path for path in sorted(folder.glob("*.yaml"))}
    trl_configs = {f"{ACCELERATE}/{name}": path for name, path in sorted(accelerate_configs().items())}
    return {**training, **trl_configs}


def recipe_path(name: str) -> Path:
    """The path of the recipe or accelerate config `name`, as `sdpg-recipes list` prints it; a `.yaml` suffix is
    accepted, and an accelerate config may be named without `accelerate/` (`zero3`), as `--accelerate_config` does."""
    recipes = list_recipes()
    key = name.removesuffix(".yaml")
    for candidate in (key, f"{ACCELERATE}/{key}"):
        if candidate in recipes:
            return recipes[candidate]
    raise FileNotFoundError(f"No shipped recipe named {name!r}. Recipes: {', '.join(recipes)}.")


def describe(path: Path) -> str:
    """The recipe's first comment line, which says what it is; for TRL's accelerate configs, that they are TRL's."""
    if path.parent != recipes_dir():
        return f"TRL's accelerate config ({path.parent.name}/{path.name})"
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def main(argv: list[str] | None = None) -> int:
    """Console entry point `sdpg-recipes`."""
    parser = argparse.ArgumentParser(prog="sdpg-recipes", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="Print every recipe's and accelerate config's name and description.")
    locate = commands.add_parser("path", help="Print the absolute path of a recipe, or of the recipes folder.")
    locate.add_argument("name", nargs="?", help="A name from `sdpg-recipes list`; omit it for the folder.")
    args = parser.parse_args(argv)

    if args.command == "list":
        recipes = list_recipes()
        width = max(map(len, recipes))
        for name, path in recipes.items():
            print(f"{name:<{width}}  {describe(path)}")
        return 0
    try:
        print(recipe_path(args.name) if args.name else recipes_dir())
    except FileNotFoundError as err:
        print(f"sdpg-recipes: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
