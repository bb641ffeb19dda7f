"""Every budget from 1.1x to the model's fastest plan is served, or refused in one line naming the most
there is: greedy over every candidate action (forecast2 and sub-layers included) on digits-dit and a
tiny DiT, optuna's space, the learned routers; and the forecast2 cost the latency model prices them with.
Speedups here are the latency model's predictions, never wall-clock timings."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from planner.errors import PlannerError
from planner.profile import profile_model
from planner.profile.latency import LatencyModel
from planner.profile.timing import REUSE_COLUMNS, REUSE_FALLBACKS, Captured, TimingConfig, time_reuse_ops
from planner.runner import Sampler
from planner.search import get_strategy
from planner.search.budget import Budget
from planner.search.context import SearchContext
from planner.search.greedy import GreedySettings, decisions_from_records

TORCH_THREADS = 2  # see conftest.py

OLD = {"block": "FD"}
NEW = {"block": "QFD", "attn": "FR", "cross_attn": "FR", "mlp": "FR"}


# --------------------------------------------------------------------------- the cost of forecast2


def _cost_table(with_q: bool) -> pd.DataFrame:
    names = ["transformer_blocks.0", "transformer_blocks.0.attn1", "transformer_blocks.0.ff"]
    rows = [{"module": n, "kind": k, "parent": p, "scope": "call", "self_ms": 1.0, "self_half_ms": 0.6,
             "reuse_ms": 0.1, "reuse_residual_ms": 0.2, "forecast_ms": 0.3, "share_cfg_ms": 0.4,
             **({"forecast2_ms": 0.5} if with_q else {})}
            for n, k, p in zip(names, ["block", "attn", "mlp"], ["", names[0], names[0]])]
    rows.append({"module": "<outside blocks>", "kind": "fixed", "parent": "", "scope": "call", "self_ms": 0.5, "self_half_ms": 0.5})
    return pd.DataFrame(rows)


def test_forecast2_is_priced_from_its_column_or_from_the_forecast_cost():
    measured = LatencyModel.from_cost_table(_cost_table(True), "cond_uncond", 4)
    old = LatencyModel.from_cost_table(_cost_table(False), "cond_uncond", 4)
    assert measured.modules[0].reuse_s["Q"] == pytest.approx(0.5e-3)
    base, factor = REUSE_FALLBACKS["forecast2_ms"]
    assert base == "forecast_ms" and old.modules[0].reuse_s["Q"] == pytest.approx(0.3e-3 * factor)
    # a plan forecasting to second order costs what the column says, not a plain reuse's cost
    codes = {"transformer_blocks.0": {"cond": "CQQQ", "uncond": "CQQQ"}}
    plan_q = type("P", (), {"decisions": codes, "code": lambda self, m, s, b="cond": codes.get(m, {b: "CCCC"})[b][s]})()
    codes_r = {"transformer_blocks.0": {"cond": "CRRR", "uncond": "CRRR"}}
    plan_r = type("P", (), {"decisions": codes_r, "code": lambda self, m, s, b="cond": codes_r.get(m, {b: "CCCC"})[b][s]})()
    assert measured.predict_run(plan_q) - measured.predict_run(plan_r) == pytest.approx(3 * (0.5e-3 - 0.1e-3))


def test_the_profiler_times_forecast2_on_each_output_size():
    cap = Captured((), {}, [torch.randn(2, 16, 32)])
    row = time_reuse_ops([cap], "cond_uncond", torch.device("cpu"), TimingConfig(warmup=1, repeats=3))[0]
    assert set(REUSE_COLUMNS.values()) <= set(row) and row["forecast2_ms"] > 0


# --------------------------------------------------------------------------- greedy's records


def test_records_keep_the_first_acceptable_candidate_of_a_trial():
    # the forecast is rejected at delta 0.1 and the residual reuse taken: both are recorded, in order
    records = [(1, "b0", {"cond": "F"}, 0.15), (1, "b0", {"cond": "D"}, 0.08), (2, "b0", {"cond": "F"}, 0.05)]
    assert decisions_from_records(records, ["b0"], ["cond"], 3, 0.1) == {"b0": {"cond": "CDF"}}
    assert decisions_from_records(records, ["b0"], ["cond"], 3, 0.2) == {"b0": {"cond": "CFF"}}
    assert decisions_from_records(records, ["b0"], ["cond"], 3, 0.01) == {"b0": {"cond": "CCC"}}


def test_greedy_settings_take_every_candidate_action_and_refuse_others():
    assert GreedySettings(actions=NEW).actions["block"] == "QFD"
    for bad in ({"block": "FX"}, {"mlp": "D"}, {"block": "FF"}, {"block": "S"}):
        with pytest.raises(ValueError):
            GreedySettings(actions=bad)


# --------------------------------------------------------------------------- greedy reaches every budget


def _grid(ctx) -> list[float]:
    """1.1x, 2x and 95% of the model's fastest plan (a greedy search each: kept short for CI)."""
    top = 0.95 * ctx.max_speedup()
    return [b for b in (1.1, 2.0) if b < top] + [math.floor(top * 100) / 100]


def _assert_greedy_reaches(ctx, actions):
    for b in _grid(ctx):
        budget = Budget(speedup=b)
        plan = get_strategy("greedy")(actions=actions).search(ctx, budget)
        predicted = ctx.predict(plan)[0]
        assert predicted == pytest.approx(plan.prediction.speedup)
        assert budget.speed_met(predicted), (b, predicted)
        used = {c for per in plan.decisions.values() for s in per.values() for c in s} - {"C"}
        assert used <= set("".join(actions.values())), used


@pytest.mark.slow  # a whole greedy search per budget of the grid
def test_greedy_meets_every_budget_up_to_the_fastest_plan_on_digits(digits10, context_of):
    _assert_greedy_reaches(context_of(digits10), OLD)


@pytest.mark.slow  # a whole greedy search per budget of the grid; sub-layer actions on the smaller model
@pytest.mark.parametrize("actions", [OLD, NEW], ids=["old-actions", "new-actions"])
def test_greedy_meets_every_budget_up_to_the_fastest_plan_on_a_tiny_dit(tiny, actions):
    runner = tiny("dit")
    sampler = runner.resolve(Sampler("default", 8, 4.0))
    profile = profile_model(runner, sampler, samples=2, lags=2, costs="flops")
    _assert_greedy_reaches(SearchContext.build(runner, sampler, profile, samples=2), actions)


def test_greedy_refuses_a_budget_beyond_the_fastest_plan_naming_it(digits10, context_of):
    ctx = context_of(digits10)
    with pytest.raises(PlannerError, match=r"cannot be met.*\d\.\d\dx"):
        get_strategy("greedy")().search(ctx, Budget(speedup=ctx.max_speedup() * 1.2))


# --------------------------------------------------------------------------- optuna's space


def test_optuna_space_widens_to_reach_the_fastest_plan(digits10, context_of):
    from planner.search.optuna_search import OptunaSettings, space_for_budget, space_reach

    ctx = context_of(digits10)
    top = 0.99 * ctx.max_speedup()
    for b in (1.1, 2.0, 3.0, top):
        space = space_for_budget(ctx, Budget(speedup=b), OptunaSettings())
        assert space_reach(ctx, space) >= b - 1e-9
    # the widest space holds the model's fastest plan
    widest = space_for_budget(ctx, Budget(speedup=top), OptunaSettings())
    assert space_reach(ctx, widest) == pytest.approx(ctx.max_speedup(), rel=1e-6)


def test_optuna_says_its_space_cannot_reach_a_budget_before_any_trial(digits10, context_of):
    ctx = context_of(digits10)
    before = ctx.evaluations
    with pytest.raises(PlannerError, match=r"beyond optuna's plan space: its fastest point predicts \d+\.\d\dx.*intervals up to 2"
                                           r".*more trials cannot help") as e:
        get_strategy("optuna")(max_interval=2, n_trials=5).search(ctx, Budget(speedup=3.0))
    assert "run more trials" not in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(PlannerError, match="beyond optuna's plan space"):
        get_strategy("optuna")(n_trials=5).search(ctx, Budget(speedup=ctx.max_speedup() * 1.5))
    assert ctx.evaluations == before  # refused before any trial ran


def test_optuna_space_offers_forecast2(digits10, context_of):
    from planner.search._space import build_space

    ctx = context_of(digits10)
    space = build_space(ctx.profile, ctx.modules, ctx.steps, actions="DQ", drift_ratio=0.0)
    assert "Q" in space.actions
    codes = space.decisions(space.uniform_params(3, "Q"))
    assert codes and all(set(c) <= {"C", "Q"} for c in codes.values())


# --------------------------------------------------------------------------- the routers


@pytest.mark.parametrize("strategy, params", [
    ("l2c", {"level": "block", "mode": "paper"}),
    ("l2c", {"level": "block", "mode": "rollout", "max_distance": 2}),
    ("harmonica", {"level": "block", "max_runs": (1,)}),
])
def test_routers_refuse_a_budget_beyond_their_reach_before_training(digits10, context_of, strategy, params):
    from planner.search._router import Router, gated_modules, router_reach

    ctx = context_of(digits10)
    names = gated_modules(ctx.modules, "block")
    router = Router(names, ctx.steps, "block", max_run=None)
    assert router_reach(ctx, router) == pytest.approx(ctx.max_speedup(), rel=1e-6)  # uncapped: the model's fastest
    before = ctx.evaluations
    with pytest.raises(PlannerError, match=r"cannot be met: the fastest plan of an? \w+ router .* predicts \d+\.\d\dx.*"
                                           r"no training changes that"):
        get_strategy(strategy)(**params).search(ctx, Budget(speedup=min(ctx.max_speedup() * 0.99, 3.5)))
    assert ctx.evaluations == before
