"""Turn a config section's `name` + `args` into an object.

`name` is a built-in short name or an import path `package.module:callable`; the
callable is called with `args` as keyword arguments. Arguments that the callable
does not accept are reported by key path before anything is built.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from pathlib import Path
from typing import Any, Callable

from distrain.errors import ConfigError, PluginError


def resolve(section: str, name: str, builtins: dict[str, Callable], key: str = "") -> Callable:
    """The callable that `<section>.name` (or the config key `key`) refers to."""
    where = key or f"{section}.name"
    if name in builtins:
        return builtins[name]
    if ":" not in name:
        close = difflib.get_close_matches(name, list(builtins), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        known = f"one of {', '.join(sorted(builtins))} or " if builtins else ""
        raise ConfigError(f"{where}: unknown {section} {name!r}; {hint}expected {known}an "
                          "import path 'package.module:callable'")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{where}: cannot import module {module_name!r} ({exc}); "
                          f"{_path_hint(module_name)}") from None
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ConfigError(f"{where}: module {module_name!r} has no attribute {attr!r}")
    if not callable(obj):
        raise ConfigError(f"{where}: {name!r} is not callable")
    return obj


def _path_hint(module_name: str) -> str:
    """Where the module might be: a folder below the working directory that holds it."""
    top = module_name.split(".")[0]
    found = sorted({str(p.parent) for pattern in (f"{top}.py", f"{top}/__init__.py")
                    for p in [*Path().glob(pattern), *Path().glob(f"*/{pattern}"),
                              *Path().glob(f"*/*/{pattern}")]})
    found = [str(Path(f).parent) if f.endswith(top) else f for f in found]
    if found:
        return (f"it is in {found[0]}/, which is not on the import path: run with "
                f"PYTHONPATH={found[0]}")
    return "put its folder on the import path (PYTHONPATH=folder) or pip install its package"


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
    callable's exception becomes a PluginError naming the key, with its own message and the
    line that raised."""
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
        return call_plugin(f"{section}.name", name, fn, *positional, **args)
    try:
        return fn(*positional, **args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{section}: {name}({_fmt(args)}) failed: {exc}") from None


def plugin_entry(key: str, entry: Any, path_alone: bool = True) -> tuple[str, dict]:
    """(name, args) of a config entry `{name: ..., args: {...}}` (or a bare
    'package.module:callable' where `path_alone`); a ConfigError naming `key` otherwise."""
    if path_alone and isinstance(entry, str):
        return entry, {}
    if isinstance(entry, dict) and isinstance(entry.get("name"), str) and \
            set(entry) <= {"name", "args"} and isinstance(entry.get("args", {}), dict):
        return entry["name"], dict(entry.get("args", {}))
    alone = "'package.module:callable' or " if path_alone else ""
    raise ConfigError(f"{key}: expected {alone}{{name: package.module:callable, args: {{...}}}}, "
                      f"got {entry!r}")


def call_plugin(key: str, name: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`; an exception from it is re-raised as a PluginError naming the
    config key, the plugin, its own message and the line that raised (the original chained)."""
    try:
        return fn(*args, **kwargs)
    except (ConfigError, PluginError):
        raise
    except Exception as exc:
        raise PluginError(f"{key}: {name} raised {type(exc).__name__}: {exc}"
                          f"{raised_at(exc)}") from exc


def raised_at(exc: BaseException) -> str:
    """' (at file:line)' of the innermost frame of `exc`'s traceback, or ''."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f" (at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})" if tb is not None else ""


def _fmt(args: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items())
