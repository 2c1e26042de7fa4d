"""Typed configs filled from a TOML file and command-line flags, with one definition per setting.

A config is a plain dataclass. Each field becomes a flag (`group_size` -> `--group-size`) and a TOML key of the
same name; flags override the file, the file overrides the defaults. The field's `help` metadata is the flag's
help text, so a setting is documented once.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def field(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with help text for its command-line flag."""
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(scalar type, optional) for annotations like `int`, `float | None`, `Path`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported config annotation {annotation!r}")
        return args[0], True
    return annotation, False


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _converter(kind: type, optional: bool):
    base = _parse_bool if kind is bool else kind

    def convert(text: str) -> Any:
        if optional and text.strip().lower() in ("none", ""):
            return None
        return base(text)

    convert.__name__ = getattr(kind, "__name__", "value")
    return convert


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of dataclass `cls`; unset flags stay None so the TOML file can fill them."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, optional = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        # A bare boolean flag (`--insecure`) means true; `--insecure false` still reads a value.
        extra: dict[str, Any] = {"nargs": "?", "const": True} if kind is bool else {}
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=_converter(kind, optional),
            default=None,
            metavar=kind.__name__.upper(),
            help=f"{f.metadata.get('help', '')} (default: {default})",
            **extra,
        )


def build(cls: type[T], toml_path: Path | None = None, flags: argparse.Namespace | None = None) -> T:
    """Defaults <- TOML file <- flags; unknown TOML keys are an error, not silently ignored."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if toml_path is not None:
        with open(toml_path, "rb") as fh:
            data = tomllib.load(fh)
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{toml_path}: unknown setting(s) {', '.join(unknown)}")
        for key, value in data.items():
            kind, optional = _base_type(hints[key])
            if value is None and optional:
                values[key] = None
            elif kind is Path:
                values[key] = Path(value)
            elif kind is float and isinstance(value, int) and not isinstance(value, bool):
                values[key] = float(value)
            elif not isinstance(value, kind):
                raise ValueError(f"{toml_path}: {key} must be {kind.__name__}, got {value!r}")
            else:
                values[key] = value
    if flags is not None:
        for key in names:
            value = getattr(flags, key, None)
            if value is not None:
                values[key] = value
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    """JSON-friendly view of a config (paths as strings)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = str(value) if isinstance(value, Path) else value
    return out


def parse(cls: type[T], prog: str, description: str, argv: list[str] | None = None) -> T:
    """The command line of a daemon: `--config FILE.toml` plus one flag per field of `cls`."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, default=None, help="TOML file with any of the settings below")
    add_flags(parser, cls)
    args = parser.parse_args(argv)
    try:
        return build(cls, args.config, args)
    except (ValueError, OSError) as err:
        parser.error(str(err))
