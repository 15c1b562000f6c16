"""Command-line plumbing shared by the entry scripts in launch/: config parsing and error reporting."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from data.config import _type_name, load_config

C = TypeVar("C")

USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError, PermissionError)
USER_ERROR_EXIT_CODE = 2


def _describe_fields(cls: type, prefix: str = "") -> list[str]:
    lines = []
    hints = typing.get_type_hints(cls)
    docs = getattr(cls, "__field_docs__", {})
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(_describe_fields(tp, prefix + field.name + "."))
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = "(required)"
        doc = docs.get(field.name, "")
        lines.append(f"  {prefix}{field.name} = {default!s}  [{_type_name(tp)}]  {doc}".rstrip())
    return lines


def cli_config(cls: type[C], description: str, argv: list[str]) -> C:
    """Parse `--config FILE key=value ...` from an explicit argv (never sys.argv) into `cls`."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (override any with key=value):\n" + "\n".join(_describe_fields(cls)),
    )
    parser.add_argument("--config", type=Path, default=None, help="YAML recipe (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. target.ratio=0.2")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return load_config(cls, args.config, args.overrides)


def run_main(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run an entry point; a user error prints one clear line and returns exit code 2, no traceback."""
    try:
        return main(argv)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
