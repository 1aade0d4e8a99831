"""Fuzzed configs (hypothesis): a malformed config exits 2 with a message that names the key,
never a traceback. Driven through the real CLI entry point (`distrain check`), in process."""

from __future__ import annotations

import dataclasses
import string
import tempfile
import typing
from pathlib import Path

import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from distrain.commands.cli import main
from distrain.config import Config

SECTIONS = {f.name: f.default_factory() for f in dataclasses.fields(Config)
            if dataclasses.is_dataclass(f.default_factory)}


def _nested(sections: dict) -> dict:
    """Every section by dotted path, nested ones too (data.sampler)."""
    out = {}
    for path, obj in sections.items():
        out[path] = obj
        inner = {f"{path}.{f.name}": getattr(obj, f.name) for f in dataclasses.fields(obj)
                 if dataclasses.is_dataclass(getattr(obj, f.name))}
        out.update(_nested(inner))
    return out


ALL_SECTIONS = _nested(SECTIONS)
FIELDS = [(section, f.name, typing.get_type_hints(type(obj))[f.name])
          for section, obj in ALL_SECTIONS.items() for f in dataclasses.fields(obj)
          if not dataclasses.is_dataclass(getattr(obj, f.name))]  # leaves; sections above


def nest(section: str, mapping: dict) -> dict:
    """{section: mapping} with a dotted section as nested mappings."""
    for part in reversed(section.split(".")):
        mapping = {part: mapping}
    return mapping
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6)
identifiers = st.text(string.ascii_lowercase + "_", min_size=1, max_size=12)


def run_check(capsys, text: str | bytes, *overrides: str, command: str = "check"
              ) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        try:
            code = main([command, "--config", str(path), f"run.out_dir={folder}/run", *overrides])
        except SystemExit as exc:  # argparse's own usage errors (an argument like `-x`)
            code = exc.code
    captured = capsys.readouterr()
    return code, captured.err


def accepts(tp, value) -> bool:
    """Whether the config's type check should take `value` for a field of type `tp`."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        if isinstance(value, str):
            try:
                float(value)
                return True
            except ValueError:
                return False
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is dict or origin is dict:
        return isinstance(value, dict) or value is None
    return isinstance(value, list)


@FUZZ
@given(section=st.sampled_from(sorted(ALL_SECTIONS)), key=identifiers)
def test_unknown_keys_are_named(capsys, section, key):
    assume(key not in {f.name for f in dataclasses.fields(ALL_SECTIONS[section])})
    code, err = run_check(capsys, yaml.safe_dump(nest(section, {key: 1})))
    assert code == 2 and "Traceback" not in err
    assert f"distrain: config error: {section}.{key}: unknown key" in err


@FUZZ
@given(field=st.sampled_from(FIELDS), value=values)
def test_wrong_types_are_named(capsys, field, value):
    section, key, tp = field
    assume(not accepts(tp, value))
    code, err = run_check(capsys, yaml.safe_dump(nest(section, {key: value})))
    assert code == 2 and "Traceback" not in err, err
    assert f"distrain: config error: {section}.{key}: expected " in err, err


@FUZZ
@given(field=st.sampled_from([f for f in FIELDS if f[2] in (int, float)]),
       value=st.one_of(st.integers(-10**9, 10**9), st.floats(-1e9, 1e9)))
def test_any_number_is_accepted_or_refused_by_name(capsys, field, value):
    section, key, tp = field
    if tp is int:
        value = int(value)
    code, err = run_check(capsys, yaml.safe_dump(nest(section, {key: value})))
    assert code in (0, 2) and "Traceback" not in err, err
    if code == 2:
        assert f"distrain: config error: {section}.{key}: expected " in err, err


def paths(doc, prefix: str = "") -> set[str]:
    """Every key path the user wrote, e.g. {'train', 'train.epochs'}."""
    out: set[str] = set()
    if isinstance(doc, dict):
        for key, value in doc.items():
            out |= {f"{prefix}{key}"} | paths(value, f"{prefix}{key}.")
    return out


def names_a_key(err: str, given: set[str] = frozenset()) -> bool:
    """The message after 'config error: ' starts with a key path (one of the schema's or one
    the user wrote, quoted when it is not an identifier), the file, or the override."""
    message = err.split("distrain: config error: ", 1)[1]
    head = message.split(":", 1)[0]
    return (head.split(".")[0] in (*SECTIONS, "config", "--config") or head.endswith("c.yaml")
            or any(message.startswith((f"{p}:", f"{p!r}:")) for p in given))


@FUZZ
@given(doc=st.one_of(values, st.dictionaries(st.sampled_from(sorted(SECTIONS)), values,
                                             min_size=1, max_size=3)))
def test_random_documents(capsys, doc):
    code, err = run_check(capsys, yaml.safe_dump(doc))
    assert code in (0, 2) and "Traceback" not in err, err
    if code == 2:
        assert names_a_key(err, paths(doc)), err


@FUZZ
@given(raw=st.one_of(st.binary(max_size=40), st.text(max_size=40)))
def test_random_bytes_and_text(capsys, raw):
    code, err = run_check(capsys, raw)
    assert code in (0, 2) and "Traceback" not in err, err
    if code == 2:
        try:
            given = paths(yaml.safe_load(raw))
        except (yaml.YAMLError, ValueError):  # not YAML, or not UTF-8
            given = set()
        assert names_a_key(err, given), err


@FUZZ
@given(override=st.text(string.ascii_letters + string.digits + "._=[]{}:,- '\"", max_size=30))
def test_random_overrides(capsys, override):
    code, err = run_check(capsys, "", override)
    assert code in (0, 2) and "Traceback" not in err, err
    if code == 2:
        if override.startswith("-") and "config error" not in err:  # argparse's option
            assert "error: unrecognized arguments: " in err or "expected one argument" in err
        else:
            parts = override.split("=", 1)[0].split(".")
            prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
            assert names_a_key(err, {override, *prefixes}), err


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(section=st.sampled_from(["model", "loss", "optimizer", "scheduler", "data"]),
       key=identifiers, value=scalars)
def test_unknown_callable_arguments_are_named_at_build_time(capsys, no_dist_env, section, key,
                                                           value):
    known = {"model": {"in_features", "hidden", "num_classes", "width", "batch_norm",
                       "dropout", "cosine_head", "channels"},
             "loss": {"label_smoothing", "weight"}, "optimizer": {"nesterov", "betas"},
             "scheduler": {"factor", "patience"}, "data": set()}[section]
    assume(key not in known)
    code, err = run_check(capsys, yaml.safe_dump({section: {"args": {key: value}}}),
                          "model.name=mlp", "scheduler.name=plateau", "train.epochs=1",
                          command="train")
    assert code == 2 and "Traceback" not in err, err
    assert f"distrain: config error: {section}.args.{key}: unknown argument" in err, err
