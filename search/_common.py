"""Shared by strategies whose plans come from one knob (an interval, a threshold)."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from planner.errors import PlannerError
from planner.plan import Plan


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
