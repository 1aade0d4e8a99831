"""`distrain config --schema`: every key, its type, default and description, from the
dataclasses; the README's configuration reference is the same text."""

import dataclasses
import typing

from conftest import ROOT

from distrain.commands.cli import main
from distrain.config import Config, field_docs
from distrain.config.schema import (
    default_text,
    format_markdown,
    readme_reference,
    readme_section,
    schema,
)


def every_field() -> list[tuple[str, object, str]]:
    """(section.key, default, docstring) of every leaf field, walked independently of schema()."""
    out = []

    def leaves(obj, prefix):  # sections inside sections too (dist.horovod, logging.profile)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                leaves(value, f"{prefix}{f.name}.")
            else:
                out.append((f"{prefix}{f.name}", value, field_docs(type(obj))[f.name]))

    leaves(Config(), "")
    return out


def test_text_schema_lists_every_key_with_type_default_and_description(capsys):
    assert main(["config", "--schema"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines if line and not line.startswith("#")}
    fields = every_field()
    assert len(rows) == len(fields)
    for key, default, doc in fields:
        assert key in rows, f"{key} missing from `distrain config --schema`"
        assert default_text(default) in rows[key] and rows[key].endswith(doc), rows[key]
    assert "logging.tensorboard" in rows and "logging.plot" in rows
    assert rows["train.epochs"].split()[1:3] == ["int", "10"]
    assert "fp32 | fp16 | bf16" in rows["train.precision"]  # a Literal shows its choices
    assert rows["data.args"].split()[1:3] == ["mapping", "{}"]
    assert rows["checkpoint.save_last"].split()[1:3] == ["bool", "true"]
    assert "# logging: " in "\n".join(lines)  # section headers carry the section's docstring


def test_markdown_schema_is_one_row_per_key(capsys):
    assert main(["config", "--schema", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out == format_markdown()
    lines = out.splitlines()
    assert lines[0] == "| key | type | default | description |"
    rows = [line for line in lines[2:] if line.startswith("| `")]
    assert len(rows) == len(lines) - 2 == len(every_field())
    assert all(line.count(" | ") == 3 for line in rows)  # four cells: doc pipes are escaped
    by_key = {line.split("`")[1]: line for line in rows}
    assert "one of `fp32`, `fp16`, `bf16`" in by_key["train.precision"]
    assert "&lt;out_dir&gt;" in by_key["checkpoint.resume"]  # stays visible on GitHub


def test_types_come_from_the_annotations():
    hints = typing.get_type_hints(type(Config().optimizer))
    keys = {k.key: k for k in schema()}
    assert hints["lr"] is float and keys["optimizer.lr"].type == "float"
    assert keys["dist.backend"].type == "auto | local | torchrun | horovod"
    assert keys["dist.backend"].section == "dist"
    assert keys["dist.horovod.op"].section == "dist"  # a section inside one: its leaves


def test_readme_reference_is_generated_from_the_config():
    current = readme_reference(ROOT / "README.md")
    assert current is not None, "README.md lacks the config-reference markers"
    assert current == readme_section(), (
        "README.md's configuration reference is stale: run `python -m distrain.config.schema README.md`")


def test_config_without_schema_is_a_usage_error(capsys):
    try:
        main(["config"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("`distrain config` without --schema should exit 2")
    assert "--schema" in capsys.readouterr().err
