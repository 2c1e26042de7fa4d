"""Typed configs filled from defaults, a TOML file and flat flags, with one definition per setting.

A config is a top dataclass whose fields are *sections* (dataclasses), written in TOML as tables:
`[sampling] temperature = 0.7`. Every setting name is unique across the sections of one config, so each setting
is also one flat flag (`--temperature 0.7`) and one keyword of `from_flat(cls, temperature=0.7)`. A plain dataclass
of settings (no sections) works the same way, its keys at the top of the TOML file. Defaults <- `--config FILE`
<- flags. Values are type-checked by pydantic (TOML and keyword values strictly, flag text parsed), then each
section's `__post_init__` runs, then the top config's. Every error names the setting, and unknown or misplaced
keys are refused with the name they were probably meant to be.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import tomli_w
from pydantic import TypeAdapter, ValidationError

T = TypeVar("T")

_SCALARS = (str, int, float, bool, Path)
_RESERVED = {"config", "print_config", "help"}  # flags every daemon has besides its settings


class ConfigError(ValueError):
    """A setting that cannot be used, with the key it is about in the message."""


def field(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field with help text for its flag; a list default is copied for each instance."""
    if isinstance(default, list):
        items = list(default)
        return dataclasses.field(default_factory=lambda: list(items), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def section(cls: type) -> Any:
    """A field of a top config holding one section, filled with that section's defaults."""
    return dataclasses.field(default_factory=cls)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting of a config: its flat name, the section it lives in (None: top-level key) and its type."""

    name: str
    section: str | None
    annotation: Any
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def where(self) -> str:
        return f"[{self.section}] {self.name}" if self.section else self.name

    @property
    def kind(self) -> Any:
        """The type without None: `int`, `Path`, `list[str]`."""
        return _unwrap(self.annotation)[0]


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(annotation without None, optional) for `int`, `float | None`, `list[str]`."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _type_name(annotation: Any) -> str:
    base, optional = _unwrap(annotation)
    if typing.get_origin(base) is list:
        name = "list of " + _type_name(typing.get_args(base)[0])
    else:
        name = "path" if base is Path else getattr(base, "__name__", str(base))
    return name + " or none" if optional else name


def _supported(annotation: Any) -> bool:
    base, _ = _unwrap(annotation)
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        return item in _SCALARS and item is not bool
    return base in _SCALARS


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def sections(cls: type) -> dict[str, type]:
    """Section name -> section dataclass of a top config; empty for a plain dataclass of settings."""
    hints = typing.get_type_hints(cls)
    found = {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}
    if found and len(found) != len(dataclasses.fields(cls)):
        raise TypeError(f"{cls.__name__}: a config holds either only sections or only settings")
    return found


def _section_settings(cls: type, section_name: str | None) -> list[Setting]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        annotation, default = hints[f.name], _field_default(f)
        where = f"{cls.__name__}.{f.name}"
        if not _supported(annotation):
            raise TypeError(f"{where}: unsupported setting type {annotation!r}")
        if default is dataclasses.MISSING:
            raise TypeError(f"{where}: a setting needs a default")
        if _unwrap(annotation)[1] and default is not None:
            raise TypeError(f"{where}: an optional setting must default to None (TOML has no None to write)")
        out.append(Setting(f.name, section_name, annotation, default, f.metadata.get("help", "")))
    return out


def settings(cls: type) -> dict[str, Setting]:
    """Every setting of config class `cls` by its flat name, in declaration order."""
    groups = sections(cls)
    found = (
        [s for name, sub in groups.items() for s in _section_settings(sub, name)]
        if groups
        else _section_settings(cls, None)
    )
    table: dict[str, Setting] = {}
    for s in found:
        if s.name in table:
            raise TypeError(f"{cls.__name__}: setting {s.name} is in both [{table[s.name].section}] and [{s.section}]")
        if s.name in _RESERVED or (s.name in groups and s.section != s.name):
            raise TypeError(f"{cls.__name__}: {s.name} is reserved and cannot be a setting name")
        table[s.name] = s
    return table


# -- values ------------------------------------------------------------------------------------------------------


def _check_value(s: Setting, value: Any) -> Any:
    """A TOML or keyword value, type-checked strictly (an int may stand for a float, a string for a path)."""
    if value is None:
        if _unwrap(s.annotation)[1]:
            return None
        raise ConfigError(f"{s.where} must be {_type_name(s.annotation)}, got None")
    try:
        return TypeAdapter(s.annotation).validate_json(json.dumps(value, default=str), strict=True)
    except (ValidationError, TypeError, ValueError):
        raise ConfigError(f"{s.where} must be {_type_name(s.annotation)}, got {value!r}") from None


def _parse_text(s: Setting, text: str | list[str]) -> Any:
    """A flag's text: `none` (or empty) for an optional, comma-separated or repeated items for a list."""
    base, optional = _unwrap(s.annotation)
    try:
        if typing.get_origin(base) is list:
            texts = [text] if isinstance(text, str) else list(text)
            items = [part for t in texts for part in t.split(",") if part != ""]
            item_type = typing.get_args(base)[0]
            return [TypeAdapter(item_type).validate_strings(part, strict=True) for part in items]
        if not isinstance(text, str):
            raise ConfigError(f"{s.flag} takes one value, got {len(text)}")
        if optional and text.strip().lower() in ("none", ""):
            return None
        return TypeAdapter(base).validate_strings(text, strict=True)
    except ValidationError:
        raise ConfigError(f"{s.flag} must be {_type_name(s.annotation)}, got {text!r}") from None


def _unknown(table: dict[str, Setting], key: str, section_name: str | None) -> str:
    here = f"[{section_name}] {key}" if section_name else key
    if key in table:
        return f"{here}: belongs in [{table[key].section}]"
    close = difflib.get_close_matches(key, list(table), n=1)
    if not close:
        return f"{here}: unknown setting"
    other = table[close[0]].section
    hint = f" in [{other}]" if section_name is not None and other != section_name else ""
    return f"{here}: unknown setting; did you mean {close[0]}{hint}?"


def _values_from_toml(cls: type, data: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Flat name -> checked value of everything a parsed TOML document sets, and the problems found."""
    table, groups = settings(cls), sections(cls)
    values: dict[str, Any] = {}
    problems: list[str] = []

    def take(key: str, value: Any, section_name: str | None) -> None:
        s = table.get(key)
        if s is None or s.section != section_name:
            problems.append(_unknown(table, key, section_name))
            return
        try:
            values[key] = _check_value(s, value)
        except ConfigError as err:
            problems.append(str(err))

    for key, value in data.items():
        if not groups:
            take(key, value, None)
        elif key in groups and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                take(sub_key, sub_value, key)
        elif key in groups:
            problems.append(f"{key}: belongs in [{key}]" if key in table else f"{key} must be a [{key}] table")
        elif key in table:
            problems.append(f"{key}: belongs in [{table[key].section}]")
        else:
            close = difflib.get_close_matches(key, list(groups), n=1)
            problems.append(f"[{key}]: unknown section" + (f"; did you mean {close[0]}?" if close else ""))
    return values, problems


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None


# -- building ------------------------------------------------------------------------------------------------------


def _construct(cls: type[T], values: Mapping[str, Any]) -> T:
    """The config with `values` (flat names, checked) over the defaults; runs every `__post_init__`."""
    groups = sections(cls)
    if not groups:
        try:
            return cls(**values)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    table, parts, problems = settings(cls), {}, []
    for name, sub in groups.items():
        mine = {k: v for k, v in values.items() if table[k].section == name}
        try:
            parts[name] = sub(**mine)
        except ValueError as err:
            problems.append(f"[{name}] {err}")
    if problems:
        raise ConfigError("\n".join(problems))
    try:
        return cls(**parts)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _flag_values(cls: type, flags: argparse.Namespace | Mapping[str, Any] | None) -> dict[str, Any]:
    """Flag text (as `add_flags` stores it) -> checked values; flags left unset are absent."""
    if flags is None:
        return {}
    given = vars(flags) if isinstance(flags, argparse.Namespace) else dict(flags)
    values, problems = {}, []
    for name, s in settings(cls).items():
        text = given.get(name)
        if text is None:
            continue
        try:
            values[name] = _parse_text(s, text)
        except ConfigError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError("\n".join(problems))
    return values


def build(cls: type[T], toml_path: Path | None = None, flags: argparse.Namespace | Mapping | None = None) -> T:
    """Defaults <- TOML file <- flags (text as `add_flags` stores it). Raises ConfigError naming each bad key."""
    values: dict[str, Any] = {}
    if toml_path is not None:
        file_values, problems = _values_from_toml(cls, _read_toml(Path(toml_path)))
        if problems:
            raise ConfigError("\n".join(f"{toml_path}: {p}" for p in problems))
        values.update(file_values)
    values.update(_flag_values(cls, flags))
    return _construct(cls, values)


def loads(cls: type[T], text: str) -> T:
    """A config from TOML text over the defaults (what `--print-config` writes loads back through this)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"not valid TOML: {err}") from None
    values, problems = _values_from_toml(cls, data)
    if problems:
        raise ConfigError("\n".join(problems))
    return _construct(cls, values)


def from_flat(cls: type[T], **values: Any) -> T:
    """A config from flat keyword values, as the flags would set them: `from_flat(LearnerConfig, group_size=4)`."""
    table = settings(cls)
    problems = [_unknown(table, key, None) for key in values if key not in table]
    checked = {}
    for key, value in values.items():
        if key in table:
            try:
                checked[key] = _check_value(table[key], value)
            except ConfigError as err:
                problems.append(str(err))
    if problems:
        raise ConfigError("\n".join(problems))
    return _construct(cls, checked)


def flat_dict(config: Any) -> dict[str, Any]:
    """Flat name -> value of every setting of a config (the inverse of `from_flat`)."""
    groups = sections(type(config))
    if not groups:
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return {name: getattr(getattr(config, s.section), name) for name, s in settings(type(config)).items()}


def replace_flat(config: T, **changes: Any) -> T:
    """A copy of `config` with some settings changed by flat name, checked and validated like `from_flat`."""
    return from_flat(type(config), **{**flat_dict(config), **changes})


def explicit_settings(cls: type, toml_path: Path | None = None, flags: argparse.Namespace | Mapping | None = None
                      ) -> set[str]:
    """Flat names that the TOML file or the flags set (as opposed to defaults): what a resumed run re-applies."""
    names = set(settings(cls))
    given = vars(flags) if isinstance(flags, argparse.Namespace) else dict(flags or {})
    found = {name for name in names if given.get(name) is not None}
    if toml_path is not None:
        for key, value in _read_toml(Path(toml_path)).items():
            keys = set(value) if isinstance(value, dict) and sections(cls) else {key}
            found |= keys & names
    return found


# -- output --------------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def to_dict(config: Any, flat: bool = False) -> dict[str, Any]:
    """JSON-friendly view of a config (paths as strings): one table per section, or flat names with `flat`."""
    groups = sections(type(config))
    if flat or not groups:
        return {name: _plain(value) for name, value in flat_dict(config).items()}
    return {name: to_dict(getattr(config, name)) for name in groups}


def to_toml(config: Any) -> str:
    """The config as TOML that `loads`/`--config` read back to an equal config; None values are left out."""
    def without_none(table: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in table.items() if v is not None}

    data = to_dict(config)
    if sections(type(config)):
        return tomli_w.dumps({name: without_none(table) for name, table in data.items()})
    return tomli_w.dumps(without_none(data))


# -- command line --------------------------------------------------------------------------------------------------


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flat flag per setting of `cls`, grouped by section; unset flags stay None so the file can fill them.

    Flags keep their text; `build` checks it. A bare boolean flag (`--insecure`) means true and `--insecure false`
    still reads a value; a list flag takes comma-separated items and may repeat; `--x none` sets an optional to None.
    """
    groups: dict[str | None, Any] = {}
    for s in settings(cls).values():
        if s.section not in groups:
            groups[s.section] = parser.add_argument_group(f"[{s.section}]") if s.section else parser
        extra: dict[str, Any] = {"metavar": _type_name(s.annotation).split(" ")[0].upper()}
        if s.kind is bool:
            extra.update(nargs="?", const="true")
        elif typing.get_origin(s.kind) is list:
            extra.update(action="append", metavar="A,B")
        default = _plain(s.default)
        help_text = f"{s.help} (default: {default})" if default not in ("", []) else s.help
        groups[s.section].add_argument(s.flag, dest=s.name, default=None, help=help_text, **extra)


def argument_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """A daemon's parser: `--config FILE.toml`, `--print-config` and one flag per setting of `cls`."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, default=None, help="TOML file with any of the settings below")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective configuration as TOML (loadable with --config) and exit")
    add_flags(parser, cls)
    return parser


def parse(cls: type[T], prog: str, description: str, argv: list[str] | None = None) -> T:
    """The command line of a daemon; exits with a message naming the key on a bad setting."""
    parser = argument_parser(cls, prog, description)
    args = parser.parse_args(argv)
    try:
        config = build(cls, args.config, args)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    if args.print_config:
        print(to_toml(config), end="", flush=True)
        parser.exit(0)
    return config
