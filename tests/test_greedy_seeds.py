"""Greedy seeded with periodic forecast schedules (issue 18): the schedules' shape, their fit to a speed
budget on the latency model, the refinement never ending worse than it starts, and the greedy search never
ending below its best seeded schedule on the calibration error."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from planner.executor import apply_plan
from planner.metrics import per_sample_rel_l1
from planner.profile import profile_model
from planner.runner import Sampler
from planner.search import get_strategy
from planner.search._periodic import (
    OUTPUT,
    PeriodicShape,
    best_periodic,
    fit_computes,
    fit_switch,
    judge_error,
    periodic_candidates,
    refine,
    with_limited_twins,
)
from planner.search.budget import Budget
from planner.search.context import SearchContext

TORCH_THREADS = 2  # see conftest.py


# --------------------------------------------------------------------------- the schedules


def test_a_periodic_schedule_computes_warmup_cooldown_and_evenly_spread_steps():
    codes = PeriodicShape("block", "F", warmup=3, cooldown=1, computes=8).codes(28)
    assert len(codes) == 28 and codes[:3] == "CCC" and codes[-1] == "C"
    assert codes.count("C") == 3 + 1 + 8 and set(codes) == {"C", "F"}
    middle = [i for i, c in enumerate(codes[3:27], start=3) if c == "C"]
    gaps = np.diff([2, *middle, 27])  # runs of forecasts between computes differ by one step at most
    assert gaps.max() - gaps.min() <= 1
    # TaylorSeer's interval 2 after three warm-up steps: compute, forecast, compute, ...
    assert PeriodicShape("block", "Q", 3, 0, 12).codes(28).startswith("CCCQCQCQ")


def test_moves_shift_one_computed_step_and_never_cross_a_neighbour():
    base = PeriodicShape("block", "F", 2, 0, 3)
    steps = 14
    middle = base.middle(steps)
    moved = PeriodicShape("block", "F", 2, 0, 3, moves=((1, 1),)).middle(steps)
    assert moved == [middle[0], middle[1] + 1, middle[2]]
    crowded = PeriodicShape("block", "F", 2, 0, 12)  # every middle step computes: no move fits
    assert PeriodicShape("block", "F", 2, 0, 12, moves=((3, 1), (0, -1))).codes(steps) == crowded.codes(steps)


def test_a_two_stride_schedule_computes_one_step_in_n_before_the_switch_and_one_in_m_after():
    # TaylorSeer's interval 2 after three warm-up steps, then every step from step 10 on
    codes = PeriodicShape("block", "F", 3, 0, 0, stride=(2, 1), switch=10).codes(16)
    assert codes == "CCCFCFCFCFC" + "CCCCC"
    # one in three until step 8, then one in two; every forecast run within a stretch is as long as the others
    assert PeriodicShape("block", "F", 2, 0, 0, stride=(3, 2), switch=8).codes(16) == "CCFFCFFCFFCFCFCF"
    # a warm-up of one step: one in two from the first step on (the second step reuses the first's output)
    assert PeriodicShape("block", "F", 1, 0, 0, stride=(2, 2)).codes(7) == "CFCFCFC"
    # a cool-down computes the last step whatever the stride says
    assert PeriodicShape("block", "F", 2, 1, 0, stride=(2, 2)).codes(9) == "CCFCFCFCC"


# --------------------------------------------------------------------------- on a model


@pytest.fixture(scope="module")
def tiny_ctx(tiny):
    runner = tiny("dit")
    sampler = runner.resolve(Sampler("default", 10, 4.0))
    profile = profile_model(runner, sampler, samples=2, lags=2, costs="flops")
    return SearchContext.build(runner, sampler, profile, samples=2)


def test_fit_computes_keeps_the_most_computed_steps_that_meet_the_budget(tiny_ctx):
    budget = Budget.parse("1.5x")
    shape = fit_computes(tiny_ctx, budget, PeriodicShape("block", "F", 2, 0, 0))
    assert shape is not None and shape.computes >= 1

    def speedup(s):
        return tiny_ctx.predict(tiny_ctx.plan(s.decisions(tiny_ctx)))[0]

    assert budget.speed_met(speedup(shape))
    one_more = PeriodicShape("block", "F", 2, 0, shape.computes + 1)
    assert not budget.speed_met(speedup(one_more))
    assert fit_computes(tiny_ctx, Budget.parse("50x"), PeriodicShape("block", "F", 2, 0, 0)) is None


def test_fit_switch_meets_the_budget_between_two_strides_with_the_most_computed_steps(tiny_ctx):
    def speedup(s):
        return tiny_ctx.predict(tiny_ctx.plan(s.decisions(tiny_ctx)))[0]

    budget = Budget.parse("1.5x")
    for stride in ((1, 2), (2, 1)):
        shape = fit_switch(tiny_ctx, budget, PeriodicShape("block", "F", 2, 0, 0, stride=stride))
        assert shape is not None and budget.speed_met(speedup(shape))
        # one switch step denser (later for a sparse start, earlier for a dense one) misses the budget
        denser = shape.switch - 1 if stride[0] > stride[1] else shape.switch + 1
        assert not budget.speed_met(speedup(PeriodicShape("block", "F", 2, 0, 0, stride=stride, switch=denser)))
    # the budget must lie between the two strides alone: stride 1 everywhere is full compute
    assert fit_switch(tiny_ctx, Budget.parse("50x"), PeriodicShape("block", "F", 2, 0, 0, stride=(2, 3))) is None
    assert fit_switch(tiny_ctx, Budget.parse("1.05x"), PeriodicShape("block", "F", 2, 0, 0, stride=(3, 2))) is None


def test_schedules_are_ranked_by_the_pooled_error_and_evaluations_also_give_the_typical_one(tiny_ctx):
    candidates = periodic_candidates(tiny_ctx, Budget.parse("1.5x"), levels=("block",), warmups=(2,))
    pooled = [c.evaluation.error for c in candidates]
    assert len(candidates) > 1 and pooled == sorted(pooled) and [c.error for c in candidates] == pooled
    # the typical error (what benchmarks/ranking_error.py ranks by instead): the inputs' errors' geometric mean
    plan = candidates[0].shape.plan(tiny_ctx)
    with apply_plan(tiny_ctx.runner.pipe, plan):
        out = tiny_ctx.runner.run(tiny_ctx.conditions, tiny_ctx.seeds, tiny_ctx.sampler, output="latent")
    each = per_sample_rel_l1(out, tiny_ctx.reference)
    typical = candidates[0].evaluation.typical
    assert typical == pytest.approx(float(each.log().mean().exp()), rel=1e-4)
    assert float(each.min()) <= typical <= float(each.max())


def test_refine_never_ends_worse_than_it_starts(tiny_ctx):
    budget = Budget.parse("1.5x")
    candidates = periodic_candidates(tiny_ctx, budget, levels=("block",), warmups=(2,), cooldowns=(0,))
    assert candidates and [c.error for c in candidates] == sorted(c.error for c in candidates)
    start = candidates[-1]
    best = refine(tiny_ctx, start, max_evaluations=4)
    assert best.error <= start.error
    assert best.shape.computes == start.shape.computes
    assert best.evaluation.predicted_speedup == pytest.approx(tiny_ctx.predict(tiny_ctx.plan(best.shape.decisions(tiny_ctx)))[0])


@pytest.mark.parametrize("budget", ["1.5x", "2x"])
def test_greedy_never_ends_below_its_best_seeded_schedule(tiny_ctx, budget):
    b = Budget.parse(budget)
    plan = get_strategy("greedy")(seed_refine=2, judge_samples=0).search(tiny_ctx, b)
    assert "judged" not in plan.provenance.params
    seeds = periodic_candidates(tiny_ctx, b)
    assert seeds, "some periodic schedule meets the budget"
    assert plan.prediction.calib_error <= seeds[0].error + 1e-9
    assert b.speed_met(plan.prediction.speedup)
    assert plan.provenance.params["chosen"] in {"greedy", "periodic"}
    # the recorded calibration error is the plan's own on the calibration inputs
    assert tiny_ctx.evaluate(plan).error == pytest.approx(plan.prediction.calib_error, rel=1e-4, abs=1e-6)
    with apply_plan(tiny_ctx.runner, plan) as h:
        tiny_ctx.runner.run(tiny_ctx.conditions, tiny_ctx.seeds, tiny_ctx.sampler, output="latent")
        assert h.stats()["computed_fraction"] < 1.0


def test_the_sweep_also_schedules_the_transformer_output_which_skips_whole_steps(tiny_ctx):
    budget, steps = Budget.parse("2x"), tiny_ctx.steps
    candidates = periodic_candidates(tiny_ctx, budget)
    whole = [c for c in candidates if c.shape.level == OUTPUT]
    assert whole and any(c.shape.level == "block" for c in candidates)
    c = whole[0]
    plan = c.shape.plan(tiny_ctx)
    codes = c.shape.codes(steps)
    assert plan.output == codes and all(plan.is_all_compute(m) for m in plan.model.modules)
    assert tiny_ctx.evaluate(plan).error == pytest.approx(c.error)
    # in FLOPs a served step costs nothing: the speedup is the step count over the computed steps, where
    # forecasting every block at the same steps still runs the layers around them
    assert c.evaluation.predicted_speedup == pytest.approx(steps / codes.count("C"))
    blocks = replace(c.shape, level="block").plan(tiny_ctx)
    assert tiny_ctx.predict(blocks)[0] < c.evaluation.predicted_speedup
    with apply_plan(tiny_ctx.runner, plan) as h:
        tiny_ctx.runner.run(tiny_ctx.conditions, tiny_ctx.seeds, tiny_ctx.sampler, output="latent")
        assert h.stats()["output"].replace("R", "F").replace("F", c.shape.code) == codes


def test_the_block_level_repeats_only_the_best_shapes_of_the_output_level(tiny_ctx):
    budget, steps = Budget.parse("2x"), tiny_ctx.steps
    full = periodic_candidates(tiny_ctx, budget, repeat_best=None)
    trimmed = periodic_candidates(tiny_ctx, budget, repeat_best=2)

    def bare(shape):  # the sweep point a schedule was fitted from
        return shape.code, shape.warmup, shape.cooldown, shape.stride

    whole = [c for c in full if c.shape.level == OUTPUT]
    assert [c.shape for c in trimmed if c.shape.level == OUTPUT] == [c.shape for c in whole]
    blocks = [c for c in trimmed if c.shape.level == "block"]
    assert len([c for c in full if c.shape.level == "block"]) > 2
    assert 0 < len(blocks) <= 2 and {bare(c.shape) for c in blocks} <= {bare(c.shape) for c in whole[:2]}
    # each repeated shape is fitted to the budget at block level as the full sweep fits it
    swept = {c.shape.key(steps): c.error for c in full}
    assert all(swept[c.shape.key(steps)] == pytest.approx(c.error) for c in blocks)
    assert [c.error for c in trimmed] == sorted(c.error for c in trimmed)


def test_greedy_hands_seed_repeat_to_the_sweep(tiny_ctx, monkeypatch):
    import planner.search._periodic as periodic

    asked, sweep = [], periodic.periodic_candidates

    def spy(*args, **kwargs):
        asked.append(kwargs.get("repeat_best", "left out"))
        return sweep(*args, **kwargs)

    monkeypatch.setattr(periodic, "periodic_candidates", spy)
    get_strategy("greedy")(seed_refine=0, judge_samples=0, seed_repeat=1).search(tiny_ctx, Budget.parse("2x"))
    assert asked == [1]


def test_the_best_second_order_schedules_take_the_limited_forecast_where_it_is_better(tiny_ctx):
    budget, steps = Budget.parse("2x"), tiny_ctx.steps
    candidates = periodic_candidates(tiny_ctx, budget)
    seen: dict = {}
    chosen = with_limited_twins(tiny_ctx, budget, candidates, 4, seen)
    second = [c for c in candidates[:4] if c.shape.code == "Q"]
    assert second, "some of the best schedules forecast to second order"
    assert len(chosen) == len(candidates) and chosen[4:] == candidates[4:]
    assert [c.error for c in chosen] == sorted(c.error for c in chosen)
    form = {c.shape.codes(steps).replace("L", "Q"): c for c in chosen[:4]}
    for before in candidates[:4]:
        after = form[before.shape.codes(steps)]  # the same schedule, in whichever form has the lower error
        if before.shape.code == "Q":
            twin = seen[replace(before.shape, code="L").key(steps)]
            assert after.error == min(before.error, twin.error)
            assert budget.speed_met(twin.evaluation.predicted_speedup)
            assert tiny_ctx.evaluate(twin.shape.plan(tiny_ctx)).error == pytest.approx(twin.error)
        else:
            assert after is before
    # a twin that would miss the budget is not even run
    q = second[0]
    tight = Budget.parse(f"{q.evaluation.predicted_speedup * 1.0001}x")
    seen = {}
    assert with_limited_twins(tiny_ctx, tight, [q], 1, seen) == [q] and not seen


def test_a_widened_context_has_more_calibration_inputs_and_is_built_once(tiny_ctx):
    wide = tiny_ctx.widened(5)
    assert len(wide.seeds) == 5 and wide.reference.shape[0] == 5 and wide.seeds[:2] == tiny_ctx.seeds
    assert tiny_ctx.widened(5) is wide and wide.costs == tiny_ctx.costs
    other = tiny_ctx.with_costs("measured")  # a FLOP-costed profile prices by FLOPs whatever is asked
    assert other.widened(5).costs == other.costs


def test_the_judge_ranks_the_finalists_and_keeps_a_refinement_only_where_it_agrees(tiny_ctx):
    budget, judge = Budget.parse("1.5x"), tiny_ctx.widened(5)
    finalists = with_limited_twins(tiny_ctx, budget, periodic_candidates(tiny_ctx, budget), 3, {})[:3]
    best = best_periodic(tiny_ctx, budget, refine_evaluations=4, judge=judge, finalists=3)
    assert best.judged == pytest.approx(judge.evaluate(best.shape.plan(judge)).error)
    # no finalist does better on the judge's inputs than what is returned
    assert best.judged <= min(judge_error(judge, c) for c in finalists) + 1e-12


def test_greedy_keeps_the_finalist_the_judge_prefers_and_records_the_judging(tiny_ctx):
    b = Budget.parse("1.5x")
    plan = get_strategy("greedy")(seed_refine=2, judge_samples=5, seeds="compare").search(tiny_ctx, b)
    judged = plan.provenance.params["judged"]
    assert judged["samples"] == 5
    winner = judged["periodic"] if plan.provenance.params["chosen"] == "periodic" else judged["greedy"]
    assert winner == min(judged["periodic"], judged["greedy"])
    wide = tiny_ctx.widened(5)
    assert wide.evaluate(wide.plan(plan.decisions, output=plan.output)).error == pytest.approx(winner, rel=1e-4, abs=1e-6)
    # the recorded calibration error stays the search's own, on its own inputs
    assert tiny_ctx.evaluate(plan).error == pytest.approx(plan.prediction.calib_error, rel=1e-4, abs=1e-6)


def test_greedy_keeps_the_periodic_schedule_by_default_and_searches_where_none_meets_the_budget(tiny_ctx, monkeypatch):
    from planner.search import _periodic

    b = Budget.parse("1.5x")
    plan = get_strategy("greedy")(seed_refine=2, judge_samples=5).search(tiny_ctx, b)
    params = plan.provenance.params
    assert params["chosen"] == "periodic" and params["passes"] == 0 and params["greedy_error"] is None
    assert set(params["judged"]) == {"samples", "periodic"} and b.speed_met(plan.prediction.speedup)
    monkeypatch.setattr(_periodic, "best_periodic", lambda *args, **kwargs: None)
    plan = get_strategy("greedy")(seed_refine=2, judge_samples=0).search(tiny_ctx, b)
    assert plan.provenance.params["chosen"] == "greedy" and plan.provenance.params["passes"] > 0
    assert b.speed_met(plan.prediction.speedup)


def test_greedy_without_seeds_is_the_plain_greedy_search(tiny_ctx):
    plan = get_strategy("greedy")(seeds="none").search(tiny_ctx, Budget.parse("1.5x"))
    assert "chosen" not in plan.provenance.params and plan.provenance.params["delta"] > 0
