"""Tests of budgets in FLOPs: the FLOP latency model a measured profile gives (equal to a FLOP-costed
profile's, close to the FLOPs the bench counts as a plan runs), searches that meet a FLOP budget and
record it in the plan, and the bench and CLI options that ask for them. No assertion reads a wall-clock time."""

from __future__ import annotations

import json

import numpy as np
import pytest

from planner.bench.flops import count_flops, flop_speedup
from planner.errors import PlannerError
from planner.executor import apply_plan
from planner.plan import load_plan, plan_for_runner
from planner.runner import Sampler
from planner.search.budget import Budget
from planner.seeds import EVAL_SEED_BASE

TORCH_THREADS = 1  # see conftest.py
SEEDS = [EVAL_SEED_BASE, EVAL_SEED_BASE + 1]


@pytest.fixture(scope="module")
def flop_profile(digits, digits_profile):
    """A FLOP-costed profile of digits-dit at the committed (measured) profile's sampler."""
    from planner.profile import profile_model

    s = digits_profile.meta.sampler
    return profile_model(digits, Sampler(s.scheduler, s.steps, s.guidance), samples=2, lags=1, costs="flops")


def _plans(names: list[str], steps: int) -> list[dict]:
    blocks = [n for n in names if n.count(".") == 1]
    every_other = "".join("C" if k % 2 == 0 or k < 3 else "F" for k in range(steps))
    return [{}, {b: every_other for b in blocks[1:]},
            {b: "C" * 4 + "D" * (steps - 4) for b in blocks[:3]},
            {n: "C" * 10 + "R" * (steps - 10) for n in names if n.endswith(".ff")}]


def test_a_measured_profiles_flop_costs_predict_what_a_flop_profile_predicts(digits_profile, flop_profile):
    measured, derived, direct = (digits_profile.latency_model(), digits_profile.latency_model("flops"),
                                 flop_profile.latency_model())
    assert derived.step_fixed_s == derived.run_fixed_s == 0.0 and all(m.hook_s == 0.0 for m in derived.modules)
    for decisions in _plans(derived.module_names, derived.steps)[1:]:
        plan = plan_for_runner_like(digits_profile, decisions)
        # the batches differ (8 calibration samples there, 2 here); FLOPs scale with them, ratios do not
        assert derived.predict_speedup(plan) == pytest.approx(direct.predict_speedup(plan), rel=1e-4)
        assert derived.predict_speedup(plan) != pytest.approx(measured.predict_speedup(plan), rel=1e-3)


def plan_for_runner_like(profile, decisions: dict):
    """A compute mask of ``decisions`` on ``profile``'s modules (what the latency model reads)."""
    names, steps = profile.module_names, profile.steps
    mask = np.ones((steps, len(names)), dtype=bool)
    for i, name in enumerate(names):
        if name in decisions:
            mask[:, i] = [c == "C" for c in decisions[name]]
    return mask


def test_flop_predictions_match_the_flops_counted_while_the_plan_runs(digits, digits_profile):
    model = digits_profile.latency_model("flops")
    sampler = digits.resolve(Sampler("ddim", digits_profile.steps, 3.0))
    conditions = digits.conditions(len(SEEDS), seed=SEEDS[0])

    def run():
        return digits.run(conditions, SEEDS, sampler)

    full, _ = count_flops(run)
    # fvcore (the profile) also counts a block's norms and modulation, which torch's counter (the bench) skips:
    # block plans agree closely, sub-layer plans within the few percent those make of a block
    for decisions, rel in zip(_plans(model.module_names, model.steps)[1:], (0.01, 0.01, 0.06)):
        plan = plan_for_runner(digits, sampler, decisions)
        counted, _ = count_flops(run, lambda plan=plan: apply_plan(digits.pipe, plan))
        assert model.predict_speedup(plan) == pytest.approx(flop_speedup(full, counted), rel=rel)


def test_a_profile_without_flop_counts_refuses_flop_costs_in_one_line(digits_profile):
    from planner.profile.artifact import Profile

    cost = digits_profile.cost.copy()
    cost["flops"] = np.nan
    blind = Profile(digits_profile.meta, digits_profile.similarity, cost)
    with pytest.raises(PlannerError, match="no FLOP counts .*--no-flops") as info:
        blind.latency_model("flops")
    assert "\n" not in str(info.value)
    with pytest.raises(PlannerError, match="costs must be one of measured, flops"):
        digits_profile.latency_model("joules")


def test_a_search_in_flops_meets_its_budget_in_flops_and_says_so(digits, digits_profile, tmp_path):
    from planner.search.api import search_plan
    from planner.search.context import SearchContext

    sampler = digits.resolve(Sampler("ddim", digits_profile.steps, 3.0))
    context = SearchContext.build(digits, sampler, digits_profile, samples=2)
    flops = context.with_costs("flops")
    assert flops.reference is context.reference and context.costs == "measured" and flops.costs == "flops"
    plan = search_plan(None, "2x", strategy="smoothcache", context=context, costs="flops", out=tmp_path / "p.json")
    assert plan.prediction.costs == "flops" and Budget.parse("2x").speed_met(plan.prediction.speedup)
    assert plan.prediction.speedup == pytest.approx(flops.latency.predict_speedup(plan))
    assert context.latency.predict_speedup(plan) < 2.0 <= flops.latency.predict_speedup(plan)  # CPU fixed costs
    assert load_plan(tmp_path / "p.json").prediction.costs == "flops"
    assert search_plan(None, "2x", strategy="smoothcache", context=context).prediction.costs == "measured"


def test_a_flop_costed_profile_prices_by_flops_whatever_is_asked(digits10, context_of):
    assert digits10.profile.priced_by("measured") == digits10.profile.priced_by("flops") == "flops"
    context = context_of(digits10)
    assert context.costs == "flops" and context.with_costs("measured") is context and context.with_costs("flops") is context


def test_search_and_bench_refuse_unknown_costs_in_one_line(cli, tmp_path):
    proc = cli("search", "--model", "digits-dit", "--costs", "joules", cwd=tmp_path)
    assert proc.returncode == 2 and "--costs" in proc.stderr and "Traceback" not in proc.stderr
    for costs in ("flops,flops", "joules", ""):
        proc = cli("bench", "--model", "digits-dit", "--costs", costs, cwd=tmp_path)
        assert proc.returncode == 2 and "costs" in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_a_plan_records_its_costs_and_older_plans_load_without(digits, tmp_path):
    from planner.plan import save_plan

    sampler = digits.resolve(Sampler("ddim", 4, 3.0))
    plan = plan_for_runner(digits, sampler, {})
    plan.prediction.costs = "flops"
    save_plan(plan, tmp_path / "p.json")
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["prediction"]["costs"] == "flops" and doc["version"] == "1.7.0"
    doc["prediction"]["costs"] = "joules"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(PlannerError, match="prediction"):
        load_plan(tmp_path / "bad.json")
    del doc["prediction"]["costs"]
    doc["version"] = "1.4.0"
    (tmp_path / "old.json").write_text(json.dumps(doc))
    assert load_plan(tmp_path / "old.json").prediction.costs is None


def test_the_bench_searches_one_plan_per_budget_and_costs(digits, digits_profile, tmp_path):
    from planner.bench.run import BenchConfig, strategy_points

    sampler = digits.resolve(Sampler("ddim", digits_profile.steps, 3.0))
    config = BenchConfig(budgets=["2x"], costs=["measured", "flops"], strategies=["smoothcache"],
                         profile=str(digits_profile.path), calib_samples=2, progress=False, out=tmp_path)
    points = {p.setting: p for p in strategy_points(digits, sampler, config)}
    assert set(points) == {"2x", "2x FLOPs"} and all(p.status == "ok" for p in points.values())
    for setting, costs, name in (("2x", "measured", "smoothcache-2x.json"), ("2x FLOPs", "flops", "smoothcache-2x-flops.json")):
        assert points[setting].plan == str(tmp_path / "plans" / name)
        assert load_plan(points[setting].plan).prediction.costs == costs
    # the same budget in FLOPs asks for less reuse than in this CPU's measured time, with its fixed costs
    assert points["2x FLOPs"].calib_error < points["2x"].calib_error


def test_the_bench_searches_a_flop_costed_profile_once_under_the_costs_asked_first(digits10, tmp_path):
    from planner.bench.run import BenchConfig, strategy_points

    config = BenchConfig(budgets=["2x"], costs=["measured", "flops"], strategies=["uniform"],
                         profile=str(digits10.folder), calib_samples=2, progress=False, out=tmp_path)
    points = strategy_points(digits10.runner, digits10.sampler, config)
    assert [p.setting for p in points] == ["2x"] and points[0].status == "ok"
    assert load_plan(points[0].plan).prediction.costs == "flops"
