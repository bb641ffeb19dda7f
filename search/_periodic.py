"""Periodic forecast schedules: the TaylorSeer-class plans a search starts from and must not end below.

TaylorSeer computes every module of a level on a few warm-up steps, then on one step in N, and
forecasts the outputs in between from the last computed ones. As a plan that is: per module the same
code string, ``C`` on the warm-up (and, optionally, the last few "cool-down") steps and on steps in
between, a forecast code (``F`` first order, ``Q`` second order) elsewhere. The steps in between are
either any whole number of them spread evenly (not only ``steps / N``), or one in N up to a switch
step and one in N +- 1 after it; both meet a speed budget as tightly as one step allows.

:func:`best_periodic` sweeps warm-up, cool-down, forecast order and placement (the transformer's whole
output (``Plan.output``), then its best few shapes again with every block alike; sub-layers on request),
fits each to the budget on the latency model (no model run), evaluates each schedule on the
calibration inputs through the executor, gives the best second-order ones the limited forecast
(``L``) where that lowers their calibration error, then moves single computed steps by one while that
lowers the calibration error (same count, same predicted cost). It returns the best schedule found
with its evaluation.
Given a judge (the same search with more calibration inputs), the sweep's few best are judged on its
inputs first, and a refined schedule is kept only where the judge agrees: a handful of calibration
inputs ranks close schedules by chance, and refining on them fits their noise. Everywhere here a
schedule's calibration error is the one :func:`ranking_error` names.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from planner.modules import modules_at_level
from planner.search.budget import first_true

FORECAST_CODES = ("F", "Q")
# The level whose schedule is the transformer's whole output (Plan.output) rather than its blocks': at a
# forecast step nothing of the transformer runs, so a step costs only its forecast; forecasting every
# block instead still runs the layers around them (embeddings, final layer) and the executor's hooks.
OUTPUT = "output"
# The second-order forecast whose second-order term is cut to the first-order one's size, per sample
# (planner.executor.hooks.limited_forecast2): the sweep's best ``Q`` schedules are also tried with it.
LIMITED = {"Q": "L"}
# Pairs of strides (compute one step in N) a schedule may switch between: neighbours, so that some pair
# brackets any budget between the every-step and the one-in-six schedules.
STRIDES = tuple((a, b) for a in range(1, 7) for b in range(1, 7) if abs(a - b) == 1)


@dataclass(frozen=True)
class PeriodicShape:
    """One periodic schedule: ``warmup`` leading and ``cooldown`` trailing computed steps, ``computes``
    computed steps spread evenly over the steps between, ``code`` on the others, at ``level``; ``moves``
    shifts single computed middle steps (index into them, +1 or -1) after the even spread."""

    level: str
    code: str
    warmup: int
    cooldown: int
    computes: int
    lean: str = "even"  # where the runs one forecast longer than the others go: spread, first or last
    moves: tuple[tuple[int, int], ...] = ()
    # Instead of ``computes`` spread evenly: compute one step in ``stride[0]`` (counted from the last warm-up
    # step) until step ``switch``, one in ``stride[1]`` from there on
    stride: tuple[int, int] | None = None
    switch: int = 0

    def middle(self, steps: int) -> list[int]:
        """The computed steps between warm-up and cool-down, in order."""
        out = self._strided(steps) if self.stride else self._spread(steps)
        return self._moved(out, steps)

    def _strided(self, steps: int) -> list[int]:
        # Every forecast run has the same length within a stretch, so each forecast extrapolates from two
        # computed steps as far apart as the run: on the digit models a forecast from adjacent computed
        # steps (the even spread's "CCF") measured several dB worse than one from steps two apart ("CFC").
        out, at, hi = [], self.warmup - 1, steps - self.cooldown
        while True:
            at += self.stride[0] if at < self.switch else self.stride[1]
            if at >= hi:
                return out
            out.append(at)

    def _spread(self, steps: int) -> list[int]:
        lo, hi = self.warmup, steps - self.cooldown
        span, k = hi - lo, max(0, min(self.computes, hi - lo))
        if k == 0:
            return []
        # k computes and span - k forecasts: the forecasts fill k + 1 runs as evenly as whole steps allow
        # (the last run may end the schedule), so the computed steps sit at even intervals; the runs one
        # longer than the rest are spread out, or all come first or last (``lean``).
        gaps = span - k
        base, extra = divmod(gaps, k + 1)
        out, at = [], lo
        for j in range(k):
            if self.lean == "early":
                run = base + (j < extra)
            elif self.lean == "late":
                run = base + (j >= k + 1 - extra)
            else:
                run = (j + 1) * gaps // (k + 1) - j * gaps // (k + 1)
            at += run
            out.append(at)
            at += 1
        return out

    def _moved(self, out: list[int], steps: int) -> list[int]:
        lo, hi = self.warmup, steps - self.cooldown
        for index, shift in self.moves:
            moved = out[index] + shift
            lo_ok = out[index - 1] + 1 if index > 0 else lo
            hi_ok = out[index + 1] - 1 if index + 1 < len(out) else hi - 1
            if lo_ok <= moved <= hi_ok:
                out[index] = moved
        return out

    def codes(self, steps: int) -> str:
        """The code string of every module of the schedule."""
        computed = set(range(min(self.warmup, steps))) | set(range(max(0, steps - self.cooldown), steps))
        computed |= set(self.middle(steps))
        return "".join("C" if i in computed else self.code for i in range(steps))

    def decisions(self, context) -> dict[str, str]:
        """The plan's per-module decisions: every module of the level alike (none at the output level)."""
        if self.level == OUTPUT:
            return {}
        codes = self.codes(context.steps)
        return {name: codes for name in modules_at_level(context.modules, self.level)}

    def plan(self, context, **kwargs):
        """The schedule as a plan of ``context`` (keyword arguments go to ``context.plan``)."""
        output = self.codes(context.steps) if self.level == OUTPUT else None
        return context.plan(self.decisions(context), output=output, **kwargs)

    def key(self, steps: int) -> tuple:
        """What tells two schedules apart: their codes and level."""
        return self.codes(steps), self.level

    def params(self) -> dict:
        """The schedule's description, as a plan's provenance records it."""
        out = {"level": self.level, "code": self.code, "warmup": self.warmup, "cooldown": self.cooldown,
               "computes": self.computes, "lean": self.lean, "moves": [list(m) for m in self.moves]}
        if self.stride:
            out |= {"stride": list(self.stride), "switch": self.switch}
        return out


def ranking_error(evaluation) -> float:
    """The calibration error schedules are ranked by: the relative L1 error pooled over the calibration
    inputs (``Evaluation.error``). The typical input's error (``Evaluation.typical``), which one input
    that drifts far off does not decide, gave no better plans over whole searches on held-out seeds
    (``benchmarks/ranking_error.py``)."""
    return evaluation.error


@dataclass
class Candidate:
    shape: PeriodicShape
    evaluation: object  # planner.search.context.Evaluation
    judged: float | None = None  # the ranking error on the judge's inputs, where judged

    @property
    def error(self) -> float:
        """The ranking error on the calibration inputs (:func:`ranking_error`)."""
        return ranking_error(self.evaluation)


def _meets(context, budget, shape: PeriodicShape) -> bool:
    """Whether ``shape``'s plan meets the speed ``budget`` on the latency model (no model run)."""
    return budget.speed_met(context.predict(shape.plan(context))[0])


def fit_computes(context, budget, shape: PeriodicShape) -> PeriodicShape | None:
    """``shape`` with the most computed middle steps whose predicted speedup still meets ``budget`` (the
    least forecasting, so the least error), or ``None`` when even no computed middle step does."""
    span = context.steps - shape.warmup - shape.cooldown
    if span <= 0:
        return None

    def meets(i: int) -> bool:  # i = 0 computes the most; meeting stays true as i grows
        return _meets(context, budget, replace(shape, computes=span - i))

    i = first_true(span + 1, meets)
    return None if i is None else replace(shape, computes=span - i)


def fit_switch(context, budget, shape: PeriodicShape) -> PeriodicShape | None:
    """``shape`` (a two-stride schedule) with the switch step whose schedule meets ``budget`` with the most
    computed steps; ``None`` unless the budget lies between the two strides alone (the denser one alone
    meeting it is another pair's schedule, or needlessly fast)."""
    lo, hi = shape.warmup, context.steps - shape.cooldown
    sparse_first = shape.stride[0] > shape.stride[1]  # then a later switch forecasts more

    def switch_at(i: int) -> int:
        return lo + i if sparse_first else hi - i

    def meets(i: int) -> bool:  # i = 0 computes the most; meeting stays true as i grows
        return _meets(context, budget, replace(shape, switch=switch_at(i)))

    i = first_true(hi - lo + 1, meets)
    return None if i is None or i == 0 else replace(shape, switch=switch_at(i))


def _evaluate(context, shape: PeriodicShape, seen: dict) -> Candidate:
    key = shape.key(context.steps)
    if key not in seen:
        seen[key] = Candidate(shape, context.evaluate(shape.plan(context)))
    return seen[key]


def _swept(context, budget, level: str, codes, warmups, cooldowns, strides):
    """Every shape of the sweep at ``level`` fitted to ``budget`` (``None`` where one cannot meet it)."""
    for code in codes:
        for warmup in warmups:
            for cooldown in cooldowns:
                yield fit_computes(context, budget, PeriodicShape(level, code, warmup, cooldown, 0))
            for stride in strides:
                yield fit_switch(context, budget, PeriodicShape(level, code, warmup, 0, 0, stride=stride))


def _twin(context, budget, shape: PeriodicShape, level: str) -> PeriodicShape | None:
    """``shape``'s code, warm-up and cool-down or strides at ``level``, fitted to ``budget`` there."""
    bare = PeriodicShape(level, shape.code, shape.warmup, shape.cooldown, 0, stride=shape.stride)
    return fit_switch(context, budget, bare) if shape.stride else fit_computes(context, budget, bare)


def periodic_candidates(context, budget, levels=(OUTPUT, "block"), codes=FORECAST_CODES,
                        warmups=(1, 2, 3, 4), cooldowns=(0, 1), strides=STRIDES, repeat_best: int | None = 4,
                        seen: dict | None = None) -> list[Candidate]:
    """Every periodic schedule of the sweep that meets ``budget``, fitted to it and evaluated on the
    calibration inputs, best (lowest calibration error) first. Shapes: computed steps spread evenly
    (each warm-up and cool-down), and two strides (each pair of ``strides``, no cool-down) switched
    where the budget is met. Levels: the first of ``levels`` (:data:`OUTPUT`, the transformer's whole
    output, blocks or sub-layers) is swept whole; each later one repeats only the ``repeat_best`` best
    shapes of the first, fitted to the budget at that level (all of the sweep where ``repeat_best`` is
    ``None``). Schedules that come out identical are evaluated once."""
    seen = {} if seen is None else seen
    levels = [lv for lv in levels if lv == OUTPUT or modules_at_level(context.modules, lv)]
    if not levels:
        return []
    out: dict = {}

    def add(shapes) -> None:
        for shape in filter(None, shapes):
            out[shape.key(context.steps)] = _evaluate(context, shape, seen)

    first, *later = levels
    add(_swept(context, budget, first, codes, warmups, cooldowns, strides))
    # The levels mostly rank shapes alike, so the first level's best few are the ones worth repeating
    # (the same plans as sweeping both whole: benchmarks/results/sweep_levels.md).
    leaders = None if repeat_best is None else sorted(out.values(), key=lambda c: c.error)[:repeat_best]
    for level in later:
        add(_swept(context, budget, level, codes, warmups, cooldowns, strides) if leaders is None
            else (_twin(context, budget, c.shape, level) for c in leaders))
    return sorted(out.values(), key=lambda c: c.error)


def refine(context, start: Candidate, max_evaluations: int, seen: dict | None = None) -> Candidate:
    """Hill-climb from ``start``: move one computed middle step one step earlier or later (the count, and
    so the predicted cost, stays) and keep the move when it lowers the calibration error; at most
    ``max_evaluations`` calibration runs. Never returns a schedule worse than ``start``."""
    seen = {} if seen is None else seen
    best, used = start, 0
    improved = True
    while improved and used < max_evaluations:
        improved = False
        n = len(best.shape.middle(context.steps))
        for index in range(n):
            for shift in (-1, 1):
                if used >= max_evaluations:
                    return best
                trial = replace(best.shape, moves=best.shape.moves + ((index, shift),))
                if trial.codes(context.steps) == best.shape.codes(context.steps):
                    continue  # the move is blocked by a neighbour
                if trial.key(context.steps) not in seen:
                    used += 1
                c = _evaluate(context, trial, seen)
                if c.error < best.error:
                    best, improved = c, True
    return best


def lean_variants(context, best: Candidate, seen: dict) -> Candidate:
    """``best`` or the variant of it whose longer forecast runs all come first or all come last, whichever
    has the lowest calibration error (two calibration runs at most; none when the runs are all equal)."""
    out = best
    for lean in ("early", "late"):
        c = _evaluate(context, replace(best.shape, lean=lean), seen)
        if c.error < out.error:
            out = c
    return out


def with_limited_twins(context, budget, candidates: list[Candidate], best: int, seen: dict) -> list[Candidate]:
    """``candidates`` (best first) with each of the ``best`` first whose forecast has a limited form (``Q``)
    replaced by the same schedule with ``L`` where that still meets ``budget`` (the limit costs a little
    more time) and has the lower calibration error; best first. The limit helps
    where a few three-point curves bend too hard (one-in-two schedules) and costs where long runs need
    the curvature, so each schedule keeps its better form; the best few stay the same schedules (a twin
    that is merely better than another schedule on a handful of inputs does not push that one out)."""
    head = []
    for c in candidates[:best]:
        twin = replace(c.shape, code=LIMITED[c.shape.code]) if c.shape.code in LIMITED else None
        if twin is not None and _meets(context, budget, twin):
            c = min(c, _evaluate(context, twin, seen), key=lambda x: x.error)
        head.append(c)
    # a form change only lowers an error, so the list stays sorted once its head is
    return sorted(head, key=lambda c: c.error) + candidates[best:]


def judge_error(judge, candidate: Candidate) -> float:
    """``candidate``'s ranking error on the ``judge`` context's inputs (run once; kept on it)."""
    if candidate.judged is None:
        candidate.judged = ranking_error(judge.evaluate(candidate.shape.plan(judge)))
    return candidate.judged


def best_periodic(context, budget, refine_evaluations: int = 12, judge=None, finalists: int = 4,
                  **sweep) -> Candidate | None:
    """The periodic forecast schedule with the lowest calibration error that meets the speed ``budget``
    (the sweep's best, its longer runs moved first or last when that helps, then refined by
    :func:`refine`), or ``None`` when no schedule meets it.

    With ``judge`` (a context with more calibration inputs): the sweep's ``finalists`` best are run on
    the judge's inputs and the best there is the one moved and refined; the result is the refined
    schedule where the judge finds it better, else the finalist (``judged`` set on it either way)."""
    seen: dict = {}
    candidates = periodic_candidates(context, budget, seen=seen, **sweep)
    if not candidates:
        return None
    candidates = with_limited_twins(context, budget, candidates, max(1, finalists), seen)
    start = candidates[0]
    if judge is not None:
        start = min(candidates[:max(1, finalists)], key=lambda c: judge_error(judge, c))
    best = lean_variants(context, start, seen)
    if refine_evaluations > 0:
        best = refine(context, best, refine_evaluations, seen)
    if judge is not None and best is not start and judge_error(judge, best) >= judge_error(judge, start):
        return start
    return best
