"""Turn a config section's `name` + `args` into an object.

`name` is a built-in short name or an import path `package.module:callable`; the
callable is called with `args` as keyword arguments. Arguments that the callable
does not accept are reported by key path before anything is built.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any, Callable

from .config import ConfigError


def resolve(section: str, name: str, builtins: dict[str, Callable]) -> Callable:
    """The callable that `<section>.name` refers to."""
    if name in builtins:
        return builtins[name]
    if ":" not in name:
        close = difflib.get_close_matches(name, list(builtins), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(
            f"{section}.name: unknown {section} {name!r}; {hint}expected one of "
            f"{', '.join(sorted(builtins))} or an import path 'package.module:callable'")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{section}.name: cannot import module {module_name!r} ({exc})") from None
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ConfigError(f"{section}.name: module {module_name!r} has no attribute {attr!r}")
    if not callable(obj):
        raise ConfigError(f"{section}.name: {name!r} is not callable")
    return obj


def check_args(section: str, fn: Callable, args: dict, positional: tuple[str, ...] = ()) -> None:
    """Fail with the key path when `args` would not bind to `fn`'s keyword parameters."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    params = sig.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in positional]
    for key in args:
        if key not in accepted:
            close = difflib.get_close_matches(str(key), accepted, n=1)
            hint = f"did you mean '{section}.args.{close[0]}'? " if close else ""
            raise ConfigError(f"{section}.args.{key}: unknown argument; {hint}"
                              f"accepted: {', '.join(accepted) or '(none)'}")
    for n, p in params.items():
        if (p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and n not in positional and n not in args):
            raise ConfigError(f"{section}.args.{n}: required argument missing")


def build(section: str, name: str, args: dict, builtins: dict[str, Callable],
          *positional: Any, positional_names: tuple[str, ...] = (),
          provide: dict[str, Callable[[], Any]] | None = None) -> Any:
    """Resolve, check and call. `provide` supplies keyword arguments the callable asks for by
    name (e.g. `class_counts`) unless the config gives them; they are computed only if asked.
    A built-in's TypeError/ValueError is a config mistake and names the section; a user
    callable's exceptions keep their traceback (they are bugs to debug)."""
    fn = resolve(section, name, builtins)
    provided = {}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    for key, supply in (provide or {}).items():
        if key in params and key not in args:
            provided[key] = supply()
    args = {**provided, **args}
    check_args(section, fn, args, positional_names)
    if name not in builtins:
        return fn(*positional, **args)
    try:
        return fn(*positional, **args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{section}: {name}({_fmt(args)}) failed: {exc}") from None


def _fmt(args: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items())
