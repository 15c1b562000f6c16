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


def _default(field: dataclasses.Field, instance: object | None) -> object:
    if instance is not None:
        return getattr(instance, field.name)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return "(required)"


def _describe_fields(cls: type, prefix: str = "", instance: object | None = None) -> list[tuple[str, object, str]]:
    """(dotted key, default, help line) of every field; a section's defaults are the owning field's."""
    rows = []
    hints = typing.get_type_hints(cls)
    docs = getattr(cls, "__field_docs__", {})
    for field in dataclasses.fields(cls):
        tp, default = hints[field.name], _default(field, instance)
        if dataclasses.is_dataclass(tp):
            rows.extend(_describe_fields(tp, prefix + field.name + ".", default))
            continue
        doc = docs.get(field.name, "")
        rows.append((prefix + field.name, default,
                     f"  {prefix}{field.name} = {default!s}  [{_type_name(tp)}]  {doc}".rstrip()))
    return rows


def cli_config(cls: type[C], description: str, argv: list[str]) -> C:
    """Parse `--config FILE key=value ...` from an explicit argv (never sys.argv) into `cls`."""
    rows = _describe_fields(cls)
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (override any with key=value):\n" + "\n".join(line for _, _, line in rows),
    )
    parser.add_argument("--config", type=Path, default=None, help="YAML recipe (see configs/)")
    key, default = next(((k, d) for k, d, _ in rows if "." in k and isinstance(d, (int, float, str))
                         and not isinstance(d, bool)), rows[0][:2])
    example = f"{key}={default}"
    parser.add_argument("overrides", nargs="*", help=f"dotted key=value overrides, e.g. {example}")
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
