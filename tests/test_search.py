"""Tests of the search: budget parsing, the CLI's refusal of impossible budgets, the greedy rule on a
hand-made error table, seed disjointness, searches on tiny Flux (true CFG) and SD3 whose plans run,
and the knob strategies meeting their predicted budgets on the committed digits-dit profile."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from planner.errors import PlannerError
from planner.evaluate import verify_plan
from planner.seeds import EVAL_SEED_BASE
from planner.executor import apply_plan
from planner.profile import TimingConfig, profile_model
from planner.runner import Sampler
from planner.search import get_strategy, strategy_names
from planner.search.budget import Budget
from planner.search.context import SearchContext
from planner.search.greedy import _GreedyPass, decisions_from_records, by_saving, first_acceptable, step_weights

ROOT = Path(__file__).resolve().parents[1]
DIGITS_PROFILE = ROOT / "profiles" / "digits-dit_ddim50_g3_cpu"
FAST = TimingConfig(warmup=1, repeats=3, run_repeats=1)


TORCH_THREADS = 2  # see conftest.py


# --------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("text, speedup", [("2x", 2.0), ("1.5x", 1.5), (" 3X ", 3.0), ("60%", 100 / 60), ("100%", 1.0)])
def test_budget_parses_speedups_and_time_fractions(text, speedup):
    b = Budget.parse(text)
    assert b.speedup == pytest.approx(speedup) and b.max_error is None
    assert b.met(speedup, 1.0) and not b.met(speedup * 0.99, 0.0)


@pytest.mark.parametrize("text", ["fast", "2", "x2", "-2x", "0.5x", "0%", "150%", "2x3", ""])
def test_budget_refuses_bad_strings(text):
    with pytest.raises(PlannerError):
        Budget.parse(text)


def test_budget_takes_an_error_target_but_not_both():
    b = Budget.parse(None, max_error=0.05)
    assert b.max_error == 0.05 and b.speedup is None and b.label() == "err0.05"
    assert b.met(1.0, 0.05) and not b.met(9.0, 0.051)
    with pytest.raises(PlannerError, match="not both"):
        Budget.parse("2x", max_error=0.05)
    with pytest.raises(PlannerError):
        Budget.parse(None, max_error=0.0)


def test_strategies_are_registered():
    assert {"greedy", "uniform", "smoothcache"} <= set(strategy_names())
    with pytest.raises(PlannerError, match="unknown strategy"):
        get_strategy("no-such-strategy")


# --------------------------------------------------------------------------- the CLI


def test_impossible_budget_exits_2_with_the_best_figure_and_writes_no_plan(tmp_path, cli):
    out = tmp_path / "plan.json"
    proc = cli("search", "--strategy", "uniform", "--budget", "50x", "--profile", str(DIGITS_PROFILE),
               "--calib-samples", "2", "--out", str(out), "--quiet", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "50x" in lines[0] and "cannot be met" in lines[0]
    best = float(lines[0].rsplit(" ", 1)[-1].rstrip("x."))
    assert 1.5 < best < 50  # the best achievable speedup, a real figure
    assert not out.exists() and not (tmp_path / "plans").exists()


# --------------------------------------------------------------------------- the greedy rule


def test_first_acceptable_takes_the_first_candidate_under_the_threshold():
    table = {"D": 0.30, "F": 0.04, "R": 0.01}
    seen = []

    def error_of(c):
        seen.append(c)
        return table[c]

    assert first_acceptable(["D", "F", "R"], error_of, 0.05) == (1, [0.30, 0.04])
    assert seen == ["D", "F"]  # stops at the first acceptable one: R is never tried
    assert first_acceptable(["D", "F"], table.get, 0.01) == (None, [0.30, 0.04])
    assert first_acceptable(["D"], table.get, 0.30) == (0, [0.30])  # at the threshold counts
    assert first_acceptable([], table.get, 1.0) == (None, [])


def test_candidates_go_from_most_to_least_saving_and_ties_keep_their_order():
    costs = {"D": 0.010, "F": 0.012, "R": 0.30, "S": 0.5}
    assert by_saving("RFD", 1.0, costs) == "FDR"  # F costs 0.2% of the block more than D: a tie
    assert by_saving("RDF", 1.0, costs) == "DFR"
    assert by_saving("RFD", 1.0, costs, tie=0.0) == "DFR"
    assert by_saving("SRF", 0.01, costs) == "FRS"
    assert by_saving("", 1.0, costs) == ""


def test_records_predict_the_plan_of_another_delta():
    records = [(1, "b0", {"cond": "D"}, 0.05), (2, "b0", {"cond": "D"}, 0.2), (1, "b1", {"cond": "D"}, 0.1)]
    d = decisions_from_records(records, ["b0", "b1"], ["cond"], 3, 0.1)
    assert d == {"b0": {"cond": "CDC"}, "b1": {"cond": "CDC"}}
    assert decisions_from_records(records, ["b0", "b1"], ["cond"], 3, 0.01)["b0"]["cond"] == "CCC"


def test_records_never_predict_a_share_whose_source_does_not_compute():
    """With separate CFG calls, uncond's share (S) of a sub-layer was measured while cond computed its block;
    at a looser delta cond's block may be reused instead: the share becomes a computation, and the plan
    stays valid."""
    b, mlp = "blocks.0", "blocks.0.ff"
    records = [(1, b, {"cond": "R"}, 0.2), (1, mlp, {"uncond": "S"}, 0.01), (2, mlp, {"uncond": "S"}, 0.01)]
    d = decisions_from_records(records, [b, mlp], ["cond", "uncond"], 3, 0.1)
    assert d[mlp]["uncond"] == "CSS"  # cond's block computes at both steps
    d = decisions_from_records(records, [b, mlp], ["cond", "uncond"], 3, 0.3)
    assert d[b]["cond"] == "CRC" and d[mlp]["uncond"] == "CCS"


def test_greedy_offers_a_share_only_where_cond_computes(digits10, context_of):
    from planner.search.greedy import DEFAULT_ACTIONS

    ctx = context_of(digits10)
    trial = _GreedyPass(ctx, 0.1, DEFAULT_ACTIONS, share_cfg=True)
    block = next(m for m in ctx.modules if m.kind == "block")
    sub = next(m for m in ctx.modules if m.name.startswith(block.name + "."))
    shares = lambda m: [c for c in trial._candidates(m, ("uncond",), 2) if "S" in c.values()]  # noqa: E731
    assert shares(block) and shares(sub)
    trial.codes[block.name]["cond"][2] = "R"  # cond's call reused the block at step 2: nothing to share below it
    assert not shares(block) and not shares(sub)
    trial.codes[block.name]["cond"][2], trial.codes[sub.name]["cond"][2] = "C", "R"
    assert not shares(sub)


def test_step_weights_tighten_steps_that_change_more():
    class P:
        def curve(self, lag, residual):
            import pandas as pd

            c = [np.nan, 0.05, 0.05, 0.05, 0.05, 0.5]
            return pd.DataFrame({"a": c, "b": c})

    w = step_weights(P(), ["a", "b"], 6)
    assert w[0] == 1.0 and w[1] == 1.0 and w[5] == pytest.approx(0.1)


@pytest.fixture(scope="module")
def tiny_dit(tiny):
    runner = tiny("dit")
    sampler = runner.resolve(Sampler("default", 5, 4.0))
    profile = profile_model(runner, sampler, samples=2, lags=2, costs="flops")
    return runner, sampler, profile


def test_greedy_pass_picks_what_a_hand_made_error_table_says(tiny_dit, monkeypatch):
    runner, sampler, profile = tiny_dit
    ctx = SearchContext.build(runner, sampler, profile, samples=2)
    blocks = [m.name for m in ctx.modules if m.kind == "block"]
    n = len(blocks)
    rng = np.random.default_rng(0)
    table = {(t, b): float(rng.uniform(0, 0.2)) for t in range(1, 5) for b in blocks}
    tried = []

    def fake_error(self, step, module, choice, at_step, reference, saved):
        tried.append((step, module, dict(choice)))
        return table[(step, module)]

    monkeypatch.setattr(_GreedyPass, "trial_error", fake_error)
    delta = 0.15
    p = _GreedyPass(ctx, delta, {"block": "D"}, share_cfg=False, weights=np.ones(5), max_run=2)
    decisions, out = p.run()
    assert torch.isfinite(out).all()
    for i, b in enumerate(blocks):
        want, run = ["C"], 0
        for t in range(1, 5):
            ok = run < 2 and table[(t, b)] <= (i + 1) / n * delta
            want.append("D" if ok else "C")
            run = run + 1 if ok else 0
        assert decisions[b] == {"cond": "".join(want), "uncond": "".join(want)}, b
    # only blocks are tried, never at step 0, never beyond the longest allowed run
    assert {m for _, m, _ in tried} <= set(blocks) and min(t for t, _, _ in tried) == 1
    assert all(c == {"cond": "D", "uncond": "D"} for _, _, c in tried)


# --------------------------------------------------------------------------- seeds


def test_calibration_and_evaluation_seeds_are_disjoint():
    with pytest.raises(PlannerError, match="calibration seeds must lie below"):
        SearchContext(None, None, None, [0, 1], [0, EVAL_SEED_BASE])
    plan = SimpleNamespace(provenance=SimpleNamespace(calib_seeds=[EVAL_SEED_BASE + 3]))
    with pytest.raises(PlannerError, match="overlap"):
        verify_plan(None, None, plan, samples=4)
    with pytest.raises(PlannerError):
        verify_plan(None, None, plan, samples=4, seed_start=EVAL_SEED_BASE - 10)


# --------------------------------------------------------------------------- tiny families


@pytest.mark.parametrize("spec, guidance, strategy, params", [
    ("tiny:flux", 3.0, "greedy", {"delta": 10.0}),  # true CFG: two separate calls per step
    ("tiny:sd3", 5.0, "greedy", {"delta": 10.0, "share_cfg": True}),
    ("tiny:sd3", 5.0, "uniform", {"level": "block"}),
])
def test_search_on_tiny_families_gives_plans_that_run(tiny, spec, guidance, strategy, params):
    runner = tiny(spec.removeprefix("tiny:"))
    sampler = runner.resolve(Sampler(runner.default_sampler.scheduler, 5, guidance))
    profile = profile_model(runner, sampler, samples=2, lags=2, costs="flops")
    ctx = SearchContext.build(runner, sampler, profile, samples=2)
    plan = get_strategy(strategy)(**params).search(ctx, Budget.parse("1.2x"))
    assert plan.provenance.strategy == strategy and plan.provenance.calib_seeds == [0, 1]
    assert plan.prediction.speedup > 1.0 and np.isfinite(plan.prediction.calib_error)
    assert any(not plan.is_all_compute(m) for m in plan.decisions)
    if strategy == "uniform":
        assert Budget.parse("1.2x").speed_met(plan.prediction.speedup)
    conds, seeds = runner.conditions(2, seed=EVAL_SEED_BASE), [EVAL_SEED_BASE, EVAL_SEED_BASE + 1]
    with apply_plan(runner, plan) as h:
        out = runner.run(conds, seeds, sampler, output="latent")
        stats = h.stats()
    assert torch.isfinite(out).all() and stats["runs"] == 1
    assert stats["computed_fraction"] < 1.0
    # the greedy pass's own run is the plan's calibration run: evaluating again gives the same error
    if strategy == "greedy":
        assert ctx.evaluate(plan).error == pytest.approx(plan.prediction.calib_error, rel=1e-4, abs=1e-6)


# --------------------------------------------------------------------------- digits-dit


@pytest.fixture(scope="module")
def digits_context(digits, digits_profile):
    sampler = Sampler("ddim", digits_profile.meta.steps, digits_profile.meta.sampler.guidance)
    return SearchContext.build(digits, sampler, digits_profile, samples=2)


@pytest.mark.parametrize("strategy", ["uniform", "smoothcache"])
@pytest.mark.parametrize("budget", ["1.5x", "2x"])
def test_knob_strategies_meet_their_predicted_budgets_on_digits(digits_context, strategy, budget):
    b = Budget.parse(budget)
    plan = get_strategy(strategy)(level="block").search(digits_context, b)
    assert b.speed_met(plan.prediction.speedup)
    assert plan.prediction.speedup == pytest.approx(digits_context.predict(plan)[0])
    assert 0 < plan.prediction.calib_error < 0.5
    assert digits_context.max_speedup() > plan.prediction.speedup


def test_a_budget_beyond_every_plan_is_refused_with_the_best_figure(digits_context):
    with pytest.raises(PlannerError, match=r"cannot be met.*\d\.\d\dx"):
        get_strategy("uniform")(level="block").search(digits_context, Budget.parse("50x"))
