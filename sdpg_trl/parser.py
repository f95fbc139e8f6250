"""`SDPGParser`: TRL's `TrlParser`, telling `SDPGConfig` which fields the user set, for its method preset."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Iterable
from typing import Any

from trl import TrlParser

from .config import SDPGConfig, _type_check, _type_name, explicit_fields_while_parsing


class SDPGParser(TrlParser):
    """`TrlParser` (a `--config` YAML, then command-line flags) whose `SDPGConfig` knows which fields were set.

    `HfArgumentParser` passes every field to each dataclass, defaults included, so `SDPGConfig` cannot tell from its
    arguments which values the user wrote. This parser tells it: the keys of the `--config` YAML and the fields named
    by flags on the command line are its `explicit_fields`, which its method preset never overwrites.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._config_keys: set[str] = set()

    def set_defaults_with_config(self, **kwargs: Any) -> list[str]:
        """TRL's: the `--config` values become the parser's defaults; their keys are remembered as set, and their
        types checked (`check_recipe_types`)."""
        self._config_keys |= set(kwargs)
        check_recipe_types(kwargs, self.dataclass_types)
        return super().set_defaults_with_config(**kwargs)

    def parse_args_into_dataclasses(self, args: Iterable[str] | None = None, *rest: Any, **kwargs: Any) -> tuple:
        """`HfArgumentParser`'s, with the `--config` keys and the flags in `args` passed to `SDPGConfig` as set."""
        args = None if args is None else list(args)
        with explicit_fields_while_parsing(self._config_keys | self.flags_given(args)):
            return super().parse_args_into_dataclasses(args, *rest, **kwargs)

    def flags_given(self, args: list[str] | None) -> set[str]:
        """The fields that flags in `args` (default: the command line) set, matched as argparse matches them
        (`--name value`, `--name=value`, `--no_name`, abbreviations)."""
        saved = [(action, action.default, action.required) for action in self._actions]
        try:
            for action in self._actions:  # a field without a flag stays out of the namespace
                action.default, action.required = argparse.SUPPRESS, False
            namespace, _ = self.parse_known_args(args)
        finally:
            for action, default, required in saved:
                action.default, action.required = default, required
        return set(vars(namespace))


def check_recipe_types(values: dict[str, Any], dataclass_types: Iterable[type]) -> None:
    """Refuse a recipe value of the wrong type for its field, naming the key, before anything is loaded.

    argparse converts a command-line flag, but a YAML value becomes the field's value as it is (`lora_r: 2.5`,
    `generation_kwargs: [1]`), and would fail only when the model or trainer reads it. `SDPGConfig` checks its own
    fields; the other dataclasses (the script arguments, `trl.ModelConfig`) are checked here. A list of text also
    takes one text (`lora_target_modules: all-linear`), as PEFT and the data arguments do.
    """
    for cls in dataclass_types:
        if issubclass(cls, SDPGConfig):
            continue
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            kind, value = hints[f.name], values[f.name]
            accepts = _type_check(kind)
            if accepts is None or accepts(value) or isinstance(value, str) and accepts([value]):
                continue
            raise TypeError(
                f"{f.name} ({cls.__name__}) must be {_type_name(kind)}, got {value!r} of type {type(value).__name__} "
                "in the --config recipe."
            )
