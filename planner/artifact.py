"""Versioned JSON documents (plans, profile metadata): one reader of their name, version and schema.

Every artifact the planner writes names its format and a semantic version. The reading rule is the
same for all of them: a file of our major version and an older or equal minor version loads; a newer
minor loads with the fields this planner does not know dropped (and a warning, as semver allows
additions); another major version is refused. Then the JSON Schema is checked, and every error,
whatever the artifact, reads ``SOURCE: $.json.path: what was expected``, on one line.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from planner.errors import PlannerError

SCHEMAS_DIR = Path(__file__).parent / "schemas"
# A hand-edited or hostile file must not take the parser down: nesting deeper than any artifact needs is refused.
MAX_JSON_DEPTH = 64


def json_path(*keys: str | int) -> str:
    """A JSONPath for error messages: ``$.decisions["transformer_blocks.3"].cond``."""
    out = "$"
    for key in keys:
        if isinstance(key, int):
            out += f"[{key}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            out += f".{key}"
        else:
            out += f"[{json.dumps(key)}]"
    return out


def parse_version(text: Any) -> tuple[int, int, int] | None:
    """``(major, minor, patch)`` of a ``MAJOR.MINOR.PATCH`` string, ``None`` for anything else."""
    if not isinstance(text, str):
        return None
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(x) for x in m.groups()) if m else None  # type: ignore[return-value]


def json_type(value: Any) -> str:
    """``an object``, ``an array``, ... for messages about a value of the wrong kind."""
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


@dataclass(frozen=True)
class DocumentFormat:
    """One artifact format: its name (the ``schema`` field), version, where the version is kept, its schema."""

    name: str
    version: str
    noun: str  # "cache plan", "profile": for messages
    version_key: str
    schema_file: str

    @cached_property
    def schema(self) -> dict:
        return json.loads((SCHEMAS_DIR / self.schema_file).read_text(encoding="utf-8"))

    def check(self, doc: Any, source: str) -> dict:
        """``doc`` checked by name, version and schema (see the module docstring); PlannerError otherwise.

        Returns the document, with unknown fields dropped when it is of a newer minor version."""
        if not isinstance(doc, dict):
            raise PlannerError(f"{source}: {json_path()}: expected a JSON object, got {json_type(doc)}")
        if doc.get("schema") != self.name:
            raise PlannerError(f"{source}: {json_path('schema')}: expected {self.name!r}, got {doc.get('schema')!r} "
                               f"(not a {self.noun}?)")
        doc = self._check_version(doc, source)
        self._check_schema(doc, source)
        return doc

    def _check_version(self, doc: dict, source: str) -> dict:
        key = self.version_key
        theirs, ours = parse_version(doc.get(key)), parse_version(self.version)
        if theirs is None:
            raise PlannerError(f"{source}: {json_path(key)}: expected a semantic version MAJOR.MINOR.PATCH, got {doc.get(key)!r}")
        if theirs[0] > ours[0]:
            raise PlannerError(f"{source}: {self.noun} format version {doc[key]} is newer than this planner reads "
                               f"({ours[0]}.x); upgrade dit-cache-planner")
        if theirs[0] < ours[0]:
            raise PlannerError(f"{source}: {self.noun} format version {doc[key]} is too old for this planner ({ours[0]}.x)")
        if theirs[1] > ours[1]:
            warnings.warn(f"{source}: {self.noun} format version {doc[key]} is newer than {self.version}; "
                          "fields this planner does not know are ignored", stacklevel=4)
            doc = _strip_unknown(doc, self.schema, self.schema)
        return doc

    def _check_schema(self, doc: dict, source: str) -> None:
        import jsonschema

        errors = list(jsonschema.Draft202012Validator(self.schema).iter_errors(doc))
        if not errors:
            return
        err = jsonschema.exceptions.best_match(errors)
        expected = err.schema.get("description") if isinstance(err.schema, dict) else None
        message = err.message if len(err.message) <= 160 else err.message[:157] + "..."
        if expected and err.validator not in ("required", "additionalProperties"):
            message = f"expected {expected}; {message}"
        raise PlannerError(f"{source}: {json_path(*err.absolute_path)}: {message}".replace("\n", " "))


def _strip_unknown(value: Any, schema: dict, root: dict) -> Any:
    """Drop object keys the schema does not know (newer-minor files: additions are ignorable by semver)."""
    if "$ref" in schema:
        schema = root["$defs"][schema["$ref"].split("/")[-1]]
    if isinstance(value, dict) and schema.get("additionalProperties") is False and "properties" in schema:
        return {k: _strip_unknown(v, schema["properties"][k], root) for k, v in value.items() if k in schema["properties"]}
    if isinstance(value, dict) and "properties" in schema:
        return {k: _strip_unknown(v, schema["properties"].get(k, {}), root) for k, v in value.items()}
    return value


def loads_json(text: str, source: str) -> Any:
    """Parse JSON text into Python values; PlannerError (one line) for invalid or too deeply nested JSON."""
    depth = max_nesting(text)
    if depth > MAX_JSON_DEPTH:
        raise PlannerError(f"{source}: JSON nested {depth} levels deep (at most {MAX_JSON_DEPTH}): not a planner artifact")
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise PlannerError(f"{source}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except _NotStrict as exc:
        raise PlannerError(f"{source}: not strict JSON: {exc} (artifacts write non-finite numbers as strings)") from None
    except ValueError as exc:  # an integer literal of thousands of digits
        raise PlannerError(f"{source}: not a planner artifact: {str(exc)[:120]}") from None


class _NotStrict(Exception):
    pass


def _refuse_constant(name: str):
    raise _NotStrict(f"bare {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotStrict(f"number {text[:20]} overflows")
    return value


def max_nesting(text: str) -> int:
    """How deeply ``[``/``{`` nest in JSON text (brackets inside strings are not counted)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest
