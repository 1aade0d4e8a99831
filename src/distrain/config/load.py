"""Loading a config: defaults < YAML file < command-line `section.key=value` overrides, each
value checked against its field's type; then checks.py. Also the YAML written beside a run."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from distrain.config.checks import check_values
from distrain.config.sections import Config
from distrain.errors import ConfigError


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a mapping", list: "a list"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
    elif tp is type(None):
        if value is None:
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        if value is None:  # `loss.args=null` clears the arguments the YAML gave
            return {}
    elif tp is list or origin is list:
        if isinstance(value, list):
            return list(value)
    else:  # pragma: no cover - a programming error in the schema
        raise TypeError(f"unsupported config type {tp!r} at {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _unknown_key(key: str, known: list[str], prefix: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
    shown = f"{prefix}{key}" if key.isidentifier() else repr(f"{prefix}{key}")
    return ConfigError(f"{shown}: unknown key{hint}")


# Top-level keys of distrain 0.1 that now live under `dist` (every distribution setting is
# there): refused in a YAML file or an override, renamed in a checkpoint's copy of a config.
MOVED = {"backend": "dist.backend", "horovod": "dist.horovod", "fsdp": "dist.fsdp"}


def _refuse_moved(data: Any) -> None:
    said = []
    for key in MOVED:
        if isinstance(data, dict) and key in data:
            leaf, value = key, data[key]
            while isinstance(value, dict) and len(value) == 1:  # name the key given
                (inner, value), = value.items()
                leaf = f"{leaf}.{inner}"
            moved = MOVED[key] + leaf[len(key):]
            shown = "" if isinstance(value, dict) else "=" + yaml.safe_dump(value).split("\n")[0]
            said.append((leaf, moved, shown))
    if said:  # every moved key in one line
        raise ConfigError("; ".join(f"{leaf}: moved to {moved}" for leaf, moved, _ in said) +
                          " (every distribution setting is under dist); write " +
                          ", ".join(f"{moved}{shown}" for _, moved, shown in said) +
                          " (in YAML: under `dist:`)")


def _is_dump(data: Any) -> bool:
    """A whole config as a run wrote it beside itself (config.yaml: every section)."""
    return isinstance(data, dict) and {"run", "data", "model", "train", "dist"} <= set(data)


def upgrade(data: dict) -> dict:
    """A config dict as distrain 0.1 wrote it (a checkpoint's copy) in today's key layout."""
    data = dict(data)
    moved = {key: data.pop(key) for key in list(MOVED) if key in data}
    if moved:
        data["dist"] = {**data.get("dist", {}), **moved}
    return data


def _merge(obj: Any, updates: dict, prefix: str = "") -> None:
    """Apply a nested mapping to a dataclass instance in place, checking keys and types."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        if key not in names:
            raise _unknown_key(str(key), names, prefix)
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value if value is not None else {}, f"{prefix}{key}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], f"{prefix}{key}"))


def _set_inside_dict(cfg: Config, parts: list[str], value: Any) -> bool:
    """`model.args.width=8`: set one key inside a mapping field, keeping the keys the YAML
    gave (while `model.args={width: 8}` replaces the mapping). False if the path does not
    lead into a mapping field."""
    obj: Any = cfg
    for i, part in enumerate(parts[:-1]):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            return False
        current = getattr(obj, part)
        if isinstance(current, dict):
            updated = copy.deepcopy(current)
            inner = updated
            for key in parts[i + 1:-1]:
                inner = inner.setdefault(key, {})
                if not isinstance(inner, dict):
                    raise ConfigError(f"{'.'.join(parts)}: {key} is not a mapping")
            inner[parts[-1]] = value
            setattr(obj, part, updated)
            return True
        obj = current
    return False


def parse_override(text: str) -> dict:
    """`train.epochs=3` -> {'train': {'epochs': 3}}; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"{text!r}: expected an override of the form section.key=value")
    path, raw = text.split("=", 1)
    if not path or any(not part for part in path.split(".")):
        raise ConfigError(f"{text!r}: expected an override of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: cannot parse {raw!r} as YAML ({exc.problem})") from None
    for part in reversed(path.split(".")):
        value = {part: value}
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file, then each `section.key=value` override, then value checks."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: no such file: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason} at byte "
                              f"{exc.start})") from None
        if _is_dump(data) and set(MOVED) & set(data):  # an earlier run's config.yaml
            print(f"distrain: warning: {path} has {', '.join(sorted(set(MOVED) & set(data)))} "
                  "outside dist (written by distrain 0.1): read as under dist", file=sys.stderr)
            data = upgrade(data)
        _refuse_moved(data)
        _merge(cfg, data)
    for item in overrides:
        path = item.split("=", 1)[0].split(".")
        update = parse_override(item)
        _refuse_moved(update)
        value = update
        for part in path:
            value = value[part]
        if not _set_inside_dict(cfg, path, value):
            _merge(cfg, update)
    check_values(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. the copy inside a checkpoint)."""
    cfg = Config()
    _merge(cfg, upgrade(data))
    check_values(cfg)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
