"""Every config key with its type, default and description, read from the config dataclasses.

    distrain config --schema              # plain text, one key a line, grouped by section
    distrain config --schema --markdown   # a Markdown table
    python -m distrain.config.schema README.md   # regenerate the README's configuration reference

The README's reference is the text between CONFIG_REFERENCE_START and CONFIG_REFERENCE_END;
a test fails when it differs from `readme_section()`, so a new field needs one rerun of the
last command above.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from distrain.config import Config, field_docs

CONFIG_REFERENCE_START = "<!-- config-reference:start -->"
CONFIG_REFERENCE_END = "<!-- config-reference:end -->"
REGENERATE = "python -m distrain.config.schema README.md"


@dataclass(frozen=True)
class Key:
    key: str  # section.key, or key for a top-level field
    type: str
    default: str
    doc: str
    section: str  # "" for a top-level field


def type_name(tp: Any) -> str:
    """`int`, `float`, `bool`, `str`, `mapping`, `list`, or a Literal's choices `a | b`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if tp is dict or origin is dict:
        return "mapping"
    if tp is list or origin is list:
        return "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def default_text(value: Any) -> str:
    """A default as it would be written in the YAML file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def schema(root: type = Config) -> list[Key]:
    """Every leaf field of the config, in declaration order (sections first, as in the YAML);
    a section inside a section (dist.horovod, logging.profile) by its own leaves."""
    keys: list[Key] = []

    def walk(obj: Any, prefix: str, section: str) -> None:
        hints, docs = typing.get_type_hints(type(obj)), field_docs(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.", section or f.name)
            else:
                keys.append(Key(f"{prefix}{f.name}", type_name(hints[f.name]),
                                default_text(value), docs.get(f.name, ""), section))

    walk(root(), "", "")
    return keys


def section_docs(root: type = Config) -> dict[str, str]:
    """Each section's one-line description (the docstring of its field in Config)."""
    docs = field_docs(root)
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(root)}


def format_text(keys: list[Key] | None = None) -> str:
    """Aligned columns, one key a line, a `# section: description` line before each section."""
    keys = schema() if keys is None else keys
    width_key = max(len(k.key) for k in keys)
    width_type = max(len(k.type) for k in keys)
    width_default = min(max(len(k.default) for k in keys), 12)
    headers, lines, current = section_docs(), [], None
    for k in keys:
        if k.section != current:
            current = k.section
            if lines:
                lines.append("")
            lines.append(f"# {k.section}: {headers[k.section]}" if k.section else "# top level")
        lines.append(f"{k.key:<{width_key}}  {k.type:<{width_type}}  "
                     f"{k.default:<{width_default}}  {k.doc}".rstrip())
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    """Text for a Markdown table cell: `|` and `*` escaped, `<...>` outside code spans kept
    visible."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # even parts are outside backticks
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")
    return "`".join(parts).replace("|", "\\|")


def _md_type(text: str) -> str:
    """`one of `a`, `b`` for a Literal's choices (no `|` inside a table), else the name."""
    choices = text.split(" | ")
    return "one of " + ", ".join(f"`{c}`" for c in choices) if len(choices) > 1 else text


def format_markdown(keys: list[Key] | None = None) -> str:
    """One Markdown table: key, type, default, description."""
    keys = schema() if keys is None else keys
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for k in keys:
        lines.append(f"| `{k.key}` | {_md_type(k.type)} | `{k.default}` | {_md(k.doc)} |")
    return "\n".join(lines) + "\n"


def readme_section() -> str:
    """What belongs between the README's markers (the markers excluded)."""
    return ("\n## Configuration reference\n\n"
            "Every key, as `section.key` in a YAML file or on the command line. Generated from "
            "`src/distrain/config/` by `" + REGENERATE + "` (also `distrain config --schema "
            "[--markdown]`); do not edit by hand.\n\n" + format_markdown() + "\n")


def _split(text: str) -> tuple[str, str, str] | None:
    """(before, between, after) the markers, or None when the text has no complete pair."""
    match = re.search(re.escape(CONFIG_REFERENCE_START) + "(.*?)" + re.escape(CONFIG_REFERENCE_END),
                      text, re.S)
    if match is None:
        return None
    return text[:match.start(1)], match.group(1), text[match.end(1):]


def readme_reference(path: str | Path) -> str | None:
    """The text between the README's markers now, or None without them."""
    parts = _split(Path(path).read_text(encoding="utf-8"))
    return parts[1] if parts else None


def write_readme(path: str | Path) -> bool:
    """Rewrite the text between the markers (append the section when missing); True if changed."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    parts = _split(text)
    if parts is None:
        new = text.rstrip("\n") + "\n\n" + CONFIG_REFERENCE_START + readme_section() + \
            CONFIG_REFERENCE_END + "\n"
    else:
        new = parts[0] + readme_section() + parts[2]
    if new == text:
        return False
    path.write_text(new, encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(f"usage: {REGENERATE}", file=sys.stderr)
        return 2
    changed = write_readme(args[0])
    print(f"{args[0]}: configuration reference {'rewritten' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
