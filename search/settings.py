"""Declared, checked strategy settings: one frozen, typed model per strategy, one parser for all.

A strategy declares its settings as a subclass of :class:`StrategySettings` (a pydantic model):
each field has a type (choices as ``Literal``), a default, a range where one makes sense, and a
one-line description. :func:`parse_settings` turns ``--param KEY=VALUE`` pairs, Python keyword
arguments and the run options of ``planner search`` into that model, or fails in one line naming
the key: unknown keys (with the closest known one), wrong types, out-of-range values, NaN, and run
options the strategy does not use. It runs before any model is loaded. :func:`describe` and
:func:`settings_table` render the declaration for ``planner strategies`` and the docs.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from planner.errors import PlannerError

# Options of ``planner search`` that reach a strategy as settings when given (``--seed 3`` -> ``seed=3``);
# a strategy takes those it declares a field for, and refuses the others.
RUN_OPTIONS = {"seed": "--seed", "n_trials": "--n-trials", "storage": "--storage", "study": "--study", "resume": "--resume"}


class StrategySettings(BaseModel):
    """Base of every strategy's settings: frozen, no unknown keys, no NaN or infinity, strict booleans."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _shape_values(cls, values: Any) -> Any:
        """A lone value (or a comma list in a string) for a list setting becomes a list; a boolean is never
        taken as a number."""
        if not isinstance(values, Mapping):
            return values
        out = dict(values)
        for name, info in cls.model_fields.items():
            keys = [name, *_aliases(info)]
            for key in keys:
                if key not in out:
                    continue
                value, hint = out[key], info.annotation
                if _is_sequence(hint) and isinstance(value, str):
                    out[key] = [v.strip() for v in value.split(",") if v.strip()]  # --param shifts=-1,0,1
                elif _is_sequence(hint) and not isinstance(value, (list, tuple)) and value is not None:
                    out[key] = [value]
                elif isinstance(value, bool) and not _accepts_bool(hint):
                    raise ValueError(f"{key} takes {_type_name(hint)}, not true/false")
        return out

    def record(self) -> dict:
        """The settings as plain JSON for a plan's provenance (every field, defaults included)."""
        return self.model_dump(mode="json")


def parse_settings(cls: type[StrategySettings], params: Mapping[str, Any], strategy: str) -> StrategySettings:
    """``cls`` from ``params``; PlannerError in one line naming the first bad key and what it takes."""
    known = set(cls.model_fields) | {a for info in cls.model_fields.values() for a in _aliases(info)}
    for key in params:
        if key in RUN_OPTIONS and key not in known:
            raise PlannerError(f"strategy {strategy} does not use {RUN_OPTIONS[key]}")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PlannerError(f"strategy {strategy} has no setting {key!r}{hint}; "
                               f"`planner strategies {strategy}` lists them")
    try:
        return cls.model_validate(dict(params))
    except ValidationError as exc:
        raise PlannerError(f"strategy {strategy}: {_first_error(exc, params)}") from None


def _first_error(exc: ValidationError, params: Mapping[str, Any]) -> str:
    err = exc.errors(include_url=False)[0]
    key = str(err["loc"][0]) if err["loc"] else None
    where = ".".join(str(p) for p in err["loc"]) + ": " if err["loc"] else ""
    given = f" (got {params[key]!r})" if key in params else ""
    message = str(err["msg"]).removeprefix("Value error, ")
    return f"{where}{message}{given}".replace("\n", " ")


# --------------------------------------------------------------------------- describing


def describe(cls: type[StrategySettings]) -> list[dict[str, Any]]:
    """One dict per setting: ``name``, ``type``, ``default``, ``range``, ``doc`` (and ``flag`` for run options)."""
    rows = []
    for name, info in cls.model_fields.items():
        default = info.get_default(call_default_factory=True)
        row = {"name": name, "type": _type_name(info.annotation), "default": _default_text(default),
               "range": _range_text(info.metadata), "doc": info.description or ""}
        if name in RUN_OPTIONS:
            row["flag"] = RUN_OPTIONS[name]
        rows.append(row)
    return rows


def settings_table(cls: type[StrategySettings]) -> str:
    """The settings as a markdown table (what the docs show for each strategy)."""
    lines = ["| setting | type | default | what it does |", "|---|---|---|---|"]
    for row in describe(cls):
        name = f"`{row['name']}`" + (f" (`{row['flag']}`)" if "flag" in row else "")
        kind = (row["type"] + (f", {row['range']}" if row["range"] else "")).replace("|", "\\|")
        lines.append(f"| {name} | {kind} | `{row['default']}` | {row['doc'].replace('|', '/')} |")
    return "\n".join(lines)


def _aliases(info) -> list[str]:
    alias = info.validation_alias
    if alias is None:
        return []
    choices = getattr(alias, "choices", [alias])
    return [c for c in choices if isinstance(c, str)]


def _strip_optional(hint):
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


def _is_sequence(hint) -> bool:
    return typing.get_origin(_strip_optional(hint)) in (tuple, list)


def _accepts_bool(hint) -> bool:
    hint = _strip_optional(hint)
    return hint is bool or hint is typing.Any or bool in typing.get_args(hint)


def _type_name(hint) -> str:
    optional = _strip_optional(hint) is not hint
    hint = _strip_optional(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        text = " | ".join(str(a) for a in args)
    elif origin in (tuple, list):
        text = f"list of {_type_name(args[0])}"
    elif origin is dict:
        text = f"{_type_name(args[0])} -> {_type_name(args[1])}"
    else:
        text = getattr(hint, "__name__", str(hint))
    return f"{text} or null" if optional else text


def _default_text(value) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value)


def _range_text(metadata) -> str:
    words = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    parts = []
    for item in metadata:
        for attr, sign in words.items():
            value = getattr(item, attr, None)
            if value is not None:
                parts.append(f"{sign} {value}")
    return " and ".join(parts)
