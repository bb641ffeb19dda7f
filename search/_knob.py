"""Shared by the knob strategies (``uniform``, ``smoothcache``): the plan of the best value of one knob
(an interval, a threshold), at the level (blocks or sub-layers) that serves the budget."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from planner.errors import PlannerError
from planner.plan import Plan
from planner.search.budget import first_true, unreachable


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
    least error), by bisection on the latency model alone (speedup grows with the knob). Error
    target: knobs are evaluated in order and the last one within the target wins (the fastest that
    is accurate enough).
    """
    knobs = list(knobs)
    if budget.speedup is not None:
        def speedup(i: int) -> float:
            return context.predict(context.plan(decisions_for(knobs[i])))[0]

        i = first_true(len(knobs), lambda j: budget.speed_met(speedup(j)))
        if i is None:
            raise unreachable(budget, speedup(len(knobs) - 1) if knobs else 1.0, how)
        decisions = decisions_for(knobs[i])
        chosen = (knobs[i], decisions, context.evaluate(context.plan(decisions)))
    else:
        chosen = None
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


def on_levels(level: str, search_at: Callable[[str], Plan], budget=None) -> Plan:
    """``search_at(level)`` for ``sublayer`` or ``block``; ``auto`` searches both and keeps the better on
    the calibration inputs: under a speed budget the plan with the lower calibration error (sub-layer
    reuse is the finer grain but keeps each block's norms and modulation, which caps its speedup
    and can leave it worse at loose budgets), under an error target the faster predicted plan. A level
    that cannot meet the budget drops out; when neither can, the block level's message is raised."""
    if level != "auto":
        return search_at(level)
    plans, errors = {}, {}
    for each in ("sublayer", "block"):
        try:
            plans[each] = search_at(each)
        except PlannerError as exc:
            errors[each] = exc
    if not plans:
        raise errors["block"]
    error_target = budget is not None and budget.speedup is None
    return min(plans.values(), key=lambda plan: _better_first(plan, error_target))


def _better_first(plan: Plan, error_target: bool) -> tuple:
    """Sort key, better plans first: lower calibration error then higher predicted speedup (speed
    budgets), or the other way round (error targets)."""
    error, speed = plan.prediction.calib_error, -(plan.prediction.speedup or 0.0)
    return (speed, error) if error_target else (error, speed)
