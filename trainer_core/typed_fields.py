"""The fields of a frozen settings dataclass, typed: each value converted to its declared type or refused with a message
naming the field (by pydantic), a value as TOML text, and each field's meaning read from its comment."""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import tokenize
import typing
from typing import Annotated, NamedTuple

import pydantic


def _not_a_bool(value):
    # pydantic's lax mode reads True as 1: `rank = true` is a slip, not a number
    if isinstance(value, bool):
        raise ValueError("true/false is not a number")
    return value


def _checked(hint):
    """The annotation pydantic checks a field with: numbers refuse booleans, also inside tuples."""
    if hint in (int, float):
        return Annotated[hint, pydantic.BeforeValidator(_not_a_bool)]
    if typing.get_origin(hint) is tuple:
        return tuple[tuple(_checked(a) if a is not Ellipsis else a for a in typing.get_args(hint))]
    return hint


@functools.cache
def _model(cls) -> type[pydantic.BaseModel]:
    hints = typing.get_type_hints(cls)
    fields = {f.name: (_checked(hints[f.name]), ...) for f in dataclasses.fields(cls)}
    return pydantic.create_model(f"{cls.__name__}Check", __config__=pydantic.ConfigDict(arbitrary_types_allowed=True),
                                 **fields)


def check_fields(obj, prefix: str = "") -> None:
    """Convert each field of the frozen dataclass `obj` to its declared type ("16" -> 16, "false" -> False), or raise a
    ValueError naming the field, the value given and the form expected. Range checks come after, in the class."""
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    try:
        checked = _model(type(obj)).model_validate(values)
    except pydantic.ValidationError as e:
        raise ValueError("\n".join(_describe(obj, prefix, error) for error in e.errors())) from None
    for name in values:
        object.__setattr__(obj, name, getattr(checked, name))


_FORMS = {int: ("a whole number", "whole numbers"), float: ("a number", "numbers"), bool: ("true or false", None),
          str: ("text in quotes", "texts in quotes")}


def _describe(obj, prefix: str, error: dict) -> str:
    name, *where = error["loc"]
    hint = typing.get_type_hints(type(obj))[name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        form = f"a list of {_FORMS.get(args[0], ('', 'values'))[1]}"
    else:
        form = _FORMS.get(hint, (str(hint),))[0]
    default = next(f.default for f in dataclasses.fields(obj) if f.name == name)
    example = f"; write e.g. {name} = {toml_text(default)}" if default not in (dataclasses.MISSING, (), "") else ""
    item = f" (item {where[0] + 1}: {toml_text(error['input'])})" if where else ""
    given = getattr(obj, name)
    reason = error["msg"].removeprefix("Value error, ")
    return f"{prefix}{name}: {toml_text(given)}{item} is not {form} ({reason}){example}"


def toml_text(value) -> str:
    """`value` as it is written in a TOML file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return f"[{', '.join(toml_text(v) for v in value)}]"
    if isinstance(value, dict):
        return f"{{{', '.join(f'{k} = {toml_text(v)}' for k, v in value.items())}}}"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


class FieldDoc(NamedTuple):
    section: str  # the `# --- section` comment above the field, "" when there is none
    name: str
    type: str  # as annotated, e.g. "int" or "tuple[int, ...]"
    default: object  # dataclasses.MISSING for a required field
    meaning: str  # the field's trailing comment


@functools.cache
def field_docs(cls) -> tuple[FieldDoc, ...]:
    """Each field of a settings dataclass with its trailing `# comment` from the class's source: the one place where a
    setting is explained, read back for `train --help` instead of being copied there."""
    source = inspect.getsource(cls)
    comments = {t.start[0]: (t.string.lstrip("#").strip(), t.line.lstrip().startswith("#"))
                for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    docs, section = [], ""
    for node in ast.parse(source).body[0].body:
        above = [text for line, (text, alone) in comments.items() if alone and line < node.lineno]
        if above and above[-1].startswith("---"):
            section = above[-1].lstrip("- ")
        if isinstance(node, ast.AnnAssign) and node.target.id in defaults:
            meaning = comments.get(node.end_lineno, ("", True))
            docs.append(FieldDoc(section, node.target.id, ast.unparse(node.annotation), defaults[node.target.id],
                                 "" if meaning[1] else meaning[0]))
    return tuple(docs)
