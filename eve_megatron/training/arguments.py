"""Command line and recipe files -> :class:`TrainConfig`.

Recipes are YAML files with one mapping per section (``model``, ``parallel``, ``data``,
``training``, ``optimizer``, ``checkpoint``, ``logging``) whose keys are the dataclass
field names. Several ``--config`` files apply in order; command-line flags (Megatron-LM
spellings, e.g. ``--tensor-model-parallel-size``) override them. Unknown sections, keys
and flags are errors that name the file, section and key.
"""

from __future__ import annotations

import argparse
import difflib
import typing
from dataclasses import fields
from typing import Any, Dict, List, Optional, Sequence

import yaml

from eve_megatron.training.config import SECTIONS, ConfigError, TrainConfig


def _base_type(hint) -> tuple:
    """``(python type, is_list)`` of a field annotation (Optional unwrapped)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union:
        return _base_type(args[0])
    if typing.get_origin(hint) in (list, List):
        return args[0], True
    return hint, False


def _field_specs():
    """``[(section, field, type, is_list, flag, help, choices)]`` of every option."""
    specs = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if not f.init:
                continue
            typ, is_list = _base_type(hints[f.name])
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            specs.append((section, f.name, typ, is_list, flag, f.metadata.get("help", ""),
                          f.metadata.get("choices")))
    return specs


def build_parser() -> argparse.ArgumentParser:
    """The ``eve_megatron.pretrain`` argument parser (defaults come from the dataclasses)."""
    p = argparse.ArgumentParser(
        prog="python -m eve_megatron.pretrain", argument_default=argparse.SUPPRESS,
        description="Train an EVE model on Megatron-Core (recipe files + Megatron-LM flags).")
    p.add_argument("--config", nargs="+", default=[], metavar="YAML",
                   help="recipe files, applied in order; flags override them")
    groups = {s: p.add_argument_group(s) for s in SECTIONS}
    for section, name, typ, is_list, flag, help_text, choices in _field_specs():
        kw: Dict[str, Any] = dict(dest=f"{section}.{name}", help=help_text)
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = typ
            if is_list:
                kw["nargs"] = "+"
            if choices:
                kw["choices"] = choices
        groups[section].add_argument(flag, **kw)
    return p


def _coerce(value, typ, is_list: bool, where: str):
    """Check/convert a YAML value to the field type; raise a clear ConfigError."""
    if value is None:
        return None
    if is_list:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_coerce(v, typ, False, where) for v in value]
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if typ is float:
        try:  # YAML 1.1 reads 2e-4 as a string
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. stage: 2
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _unknown(kind: str, name: str, valid: Sequence[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown {kind} {name!r}{hint}; valid: {', '.join(valid)}")


def apply_recipe(cfg: TrainConfig, path: str) -> None:
    """Apply one YAML recipe to ``cfg`` in place."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read recipe ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    specs = {(s, n): (t, li, ch) for s, n, t, li, _, _, ch in _field_specs()}
    for section, values in data.items():
        if section not in SECTIONS:
            raise _unknown("section", str(section), list(SECTIONS), path)
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping")
        valid = [n for s, n in specs if s == section]
        for key, value in values.items():
            where = f"{path}: {section}.{key}"
            if (section, key) not in specs:
                raise _unknown(f"key in section {section!r}", str(key), valid, path)
            typ, is_list, choices = specs[(section, key)]
            value = _coerce(value, typ, is_list, where)
            if choices and value is not None and value not in choices:
                raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
            setattr(getattr(cfg, section), key, value)


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Recipes (``--config``) then flags -> a :class:`TrainConfig` (not yet validated
    against the world size; see :meth:`TrainConfig.validate`)."""
    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    cfg = TrainConfig()
    for path in ns.pop("config", []):
        apply_recipe(cfg, path)
    for dest, value in ns.items():
        section, name = dest.split(".", 1)
        setattr(getattr(cfg, section), name, value)
    return cfg


def config_to_dict(cfg: TrainConfig) -> Dict[str, Dict[str, Any]]:
    """Plain ``{section: {field: value}}`` (what a checkpoint records, YAML-able)."""
    return {s: {f.name: getattr(getattr(cfg, s), f.name) for f in fields(cls) if f.init}
            for s, cls in SECTIONS.items()}
