"""The recipes shipped with sdpg-trl: training recipes (`sdpg-train`, `sdpg-compare`) and accelerate configs.

    sdpg-recipes list                        # every recipe: name and what it is
    sdpg-recipes path demo_cpu               # absolute path of one (a name from `list`, `.yaml` optional)
    sdpg-recipes path accelerate/zero2
    sdpg-recipes path                        # the folder, to copy one and edit it

    accelerate launch --config_file "$(sdpg-recipes path accelerate/zero2)" -m sdpg_trl.scripts.train \\
        --config "$(sdpg-recipes path qwen3_4b_sdpg_urkl)"

They are package data (`sdpg_trl/recipes/`, as TRL ships its accelerate configs), so an installed wheel has them. In
a checkout of the repository, `recipes/` is a link to the same folder, so the paths in the docs work there too.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

ACCELERATE = "accelerate"


def recipes_dir() -> Path:
    """The folder of shipped recipes inside the installed (or checked-out) package."""
    folder = resources.files("sdpg_trl") / "recipes"
    if not isinstance(folder, Path) or not folder.is_dir():  # installed unpacked, as pip does; not from a zip
        raise FileNotFoundError(f"sdpg-trl's recipes folder is missing at {folder}: reinstall sdpg-trl.")
    return folder


def list_recipes() -> dict[str, Path]:
    """Name -> path of every shipped recipe: training recipes first (`demo_cpu`), then `accelerate/<config>`."""
    folder = recipes_dir()
    training = sorted(folder.glob("*.yaml"))
    accelerate = sorted((folder / ACCELERATE).glob("*.yaml"))
    return {path.relative_to(folder).with_suffix("").as_posix(): path for path in training + accelerate}


def recipe_path(name: str) -> Path:
    """The path of the shipped recipe `name` (as `sdpg-recipes list` prints it; a `.yaml` suffix is accepted)."""
    recipes = list_recipes()
    key = name.removesuffix(".yaml")
    if key not in recipes:
        raise FileNotFoundError(f"No shipped recipe named {name!r}. Recipes: {', '.join(recipes)}.")
    return recipes[key]


def describe(path: Path) -> str:
    """The recipe's first comment line, which says what it is."""
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
    commands.add_parser("list", help="Print every shipped recipe's name and description.")
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
