"""Shared by strategies: checked config from params, and the plan of the best value of one knob (an
interval, a threshold)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, Iterable, Sequence

from planner.errors import PlannerError
from planner.plan import Plan
from search import RUN_OPTIONS

# Run options a strategy without a study or storage refuses when they are given.
STUDY_OPTIONS = ("n_trials", "storage", "study")


def check_params(params: dict, allowed: Sequence[str], strategy: str) -> None:
    """PlannerError naming the first parameter ``strategy`` does not know."""
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise PlannerError(f"{strategy} has no parameter {unknown[0]!r}; it takes {', '.join(sorted(set(allowed)))}")


def config_from_params(cls, params: dict, strategy: str, aliases: dict[str, str] | None = None):
    """The config dataclass ``cls`` from a strategy's params, converted to each field's type and checked
    (``cls.check()``); PlannerError for an unknown key, a study option (``--n-trials``, ``--storage``,
    ``--study``), a value of the wrong type or one ``check`` refuses. ``aliases`` maps a one-value key
    onto a tuple field (``beta`` -> ``betas``); run options that are not fields (``resume``) are left out."""
    aliases = aliases or {}
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    check_params(params, [*fields, *aliases, *RUN_OPTIONS], strategy)
    for key in STUDY_OPTIONS:
        if params.get(key) is not None and key not in fields:
            raise PlannerError(f"{strategy} does not use --{key.replace('_', '-')}")
    values = {k: v for k, v in params.items() if k in fields}
    values.update({field: [params[alias]] for alias, field in aliases.items() if alias in params})
    try:
        values = {k: _as_type(v, hints[k], k) for k, v in values.items()}
    except (TypeError, ValueError) as e:
        raise PlannerError(f"{strategy} parameter has the wrong type: {e}") from None
    cfg = cls(**values)
    cfg.check()
    return cfg


def _as_type(value, hint, name: str):
    """``value`` as ``hint`` says: int, float, a strict bool, ``X | None``, ``tuple[X, ...]`` (a list or one value)."""
    args = typing.get_args(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise PlannerError(f"{name} must be true or false, got {value!r}")
        return value
    if typing.get_origin(hint) is tuple:
        return tuple(_as_type(x, args[0], name) for x in (value if isinstance(value, (list, tuple)) else [value]))
    if type(None) in args:
        return None if value is None else _as_type(value, next(a for a in args if a is not type(None)), name)
    return hint(value) if hint in (int, float) else value


def unreachable(budget, best_speedup: float, how: str) -> PlannerError:
    """The error for a speed budget no plan reaches, with the best predicted figure there is."""
    return PlannerError(f"budget {budget.label()} cannot be met: the best predicted speedup {how} is {best_speedup:.2f}x")


def choose_knob(
    context,
    budget,
    knobs: Iterable[Any],
    decisions_for: Callable[[Any], dict],
    strategy: str,
    params_for: Callable[[Any], dict],
    how: str,
) -> Plan:
    """The plan of the best knob value; ``knobs`` go from least to most aggressive.

    Speed budget: the first knob whose predicted speedup meets it (the least aggressive, so the
    least error), found by bisection on the latency model alone (speedup grows with the knob). Error target: knobs are evaluated in order
    and the last one within the target wins (the fastest that is accurate enough).
    """
    knobs = list(knobs)
    chosen = None
    if budget.speedup is not None:
        # Speedup grows with the knob: bisect for the first knob that meets the budget.
        def speedup(i):
            return context.predict(context.plan(decisions_for(knobs[i])))[0]

        lo, hi = 0, len(knobs) - 1
        if not knobs or speedup(hi) < budget.speedup - 1e-9:
            raise unreachable(budget, speedup(hi) if knobs else 1.0, how)
        while lo < hi:
            mid = (lo + hi) // 2
            if speedup(mid) >= budget.speedup - 1e-9:
                hi = mid
            else:
                lo = mid + 1
        decisions = decisions_for(knobs[lo])
        chosen = (knobs[lo], decisions, context.evaluate(context.plan(decisions)))
    else:
        for knob in knobs:
            decisions = decisions_for(knob)
            evaluation = context.evaluate(context.plan(decisions))
            if evaluation.error > budget.max_error:
                break
            chosen = (knob, decisions, evaluation)
        if chosen is None:
            raise PlannerError(f"no plan {how} keeps the calibration error within {budget.max_error:g}")
    knob, decisions, evaluation = chosen
    return context.plan(decisions, strategy=strategy, params=params_for(knob), evaluation=evaluation)


def on_levels(level: str, search_at: Callable[[str], Plan]) -> Plan:
    """``search_at(level)`` for ``sublayer`` or ``block``; ``auto`` tries sub-layers first (the
    finer, usually more accurate granularity) and falls back to blocks when they cannot meet the
    budget (sub-layer reuse keeps each block's norms and modulation, which caps its speedup)."""
    if level not in ("auto", "sublayer", "block"):
        raise PlannerError(f"level must be auto, sublayer or block, got {level!r}")
    if level != "auto":
        return search_at(level)
    try:
        return search_at("sublayer")
    except PlannerError:
        return search_at("block")
