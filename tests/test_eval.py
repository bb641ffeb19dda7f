"""Tests of ``planner eval`` and ``planner bench``: held-out seeds, the interleaved timing harness, an
all-compute plan reporting ~1x and infinite PSNR, the peer tools (run for real, isolated from the
model, skipped with a clear message when the ``[bench]`` extra is missing), the report shapes, and a
bench run on a tiny setting that writes its CSV, markdown, plot and environment."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from planner.bench.peers import DEFAULT_WARMUPS, PEERS, WARMUP_KNOBS, parse_sweeps, parse_warmups, peer_runs
from planner.bench.margins import pareto_front, quality_at
from planner.commands.bench import parse_strategy_params
from planner.errors import PlannerError
from planner.evaluate import (REFERENCE, Contender, Timing, eval_markdown, evaluate_plan, interleaved_order,
                              time_against_reference, timing_noise)
from planner.io import json_safe
from planner.seeds import EVAL_SEED_BASE, check_held_out, format_seeds, parse_seeds
from planner.plan import plan_for_runner, save_plan
from planner.profile import TimingConfig, profile_model
from planner.runner import Sampler

STEPS = 6
FAST = TimingConfig(warmup=1, repeats=3, run_repeats=1)


TORCH_THREADS = 1  # see conftest.py


@pytest.fixture(scope="module")
def digits6(digits):
    return digits, digits.resolve(Sampler("ddim", STEPS, 3.0))


# --------------------------------------------------------------------------- seeds


def test_seed_syntax_round_trips_and_refuses_nonsense():
    assert parse_seeds("100..103") == [100, 101, 102, 103]
    assert parse_seeds("7, 1..2,2") == [1, 2, 7]
    assert format_seeds([1, 2, 3, 7, 9, 10]) == "1..3,7,9..10"
    assert parse_seeds(format_seeds([5, 6, 8])) == [5, 6, 8]
    for bad in ("", "a..b", "5..3", "1-4", "-3"):
        with pytest.raises(PlannerError):
            parse_seeds(bad)


def test_seeds_overlapping_the_calibration_seeds_are_refused_unless_forced(digits6):
    runner, sampler = digits6
    plan = plan_for_runner(runner, sampler, calib_seeds=[0, 1, 2, 3])
    with pytest.raises(PlannerError, match=r"overlap the plan's calibration seeds \(2\.\.3\)"):
        check_held_out([2, 3, 4], plan.provenance.calib_seeds)
    check_held_out([2, 3, 4], plan.provenance.calib_seeds, force=True)  # no error
    # refused before any model runs: the runner is never touched
    with pytest.raises(PlannerError, match="overlap"):
        evaluate_plan(None, None, plan, [3, 4])
    out = evaluate_plan(runner, sampler, plan, [3, 4], repeats=1, warmup=0, force=True)
    assert out["seeds"] == "3..4" and out["n"] == 2


def test_eval_cli_refuses_calibration_seeds_in_one_line(digits6, cli, tmp_path):
    runner, sampler = digits6
    path = save_plan(plan_for_runner(runner, sampler, calib_seeds=list(range(8))), tmp_path / "plan.json")
    proc = cli("eval", "--plan", str(path), "--seeds", "0..3", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "overlap" in lines[0] and "--force" in lines[0]


# --------------------------------------------------------------------------- the timing harness


def test_timing_interleaves_runs_and_pairs_each_with_the_reference_around_it():
    calls, now = [], [0.0]
    cost = {REFERENCE: 2.0, "a": 1.0, "b": 4.0}

    def clock():
        return now[0]

    def runner(name):
        def run():
            calls.append(name)
            now[0] += cost[name]
            return name
        return run

    @contextlib.contextmanager
    def hooks():
        calls.append("install")
        yield
        calls.append("remove")

    timed = time_against_reference(
        Contender(runner(REFERENCE)), {"a": Contender(runner("a"), context=hooks), "b": Contender(runner("b"))},
        repeats=2, warmup=1, reference_every=1, clock=clock,
    )
    runs = [c for c in calls if c not in ("install", "remove")]
    assert runs[:3] == [REFERENCE, "a", "b"]  # warm-up round first
    assert runs[3:] == ["full", "a", "full", "b", "full", "a", "full", "b", "full"] == timed.order
    assert calls[calls.index("a") - 1] == "install" and calls[calls.index("a") + 1] == "remove"
    assert timed.timings["a"].speedup == pytest.approx(2.0) and timed.timings["b"].speedup == pytest.approx(0.5)
    assert timed.timings["a"].speedup_range == pytest.approx((2.0, 2.0)) and len(timed.timings["a"].seconds) == 2
    assert timed.outputs == {REFERENCE: REFERENCE, "a": "a", "b": "b"}
    assert interleaved_order(["a", "b", "c"], 1, 2) == ["full", "a", "b", "full", "c", "full"]


def test_drift_hits_both_sides_of_each_ratio():
    # the machine slows down 10 % per run: bracketing references keep the ratio near the truth (2x)
    now, factor = [0.0], [1.0]

    def run(cost):
        def f():
            now[0] += cost * factor[0]
            factor[0] *= 1.1
        return f

    timed = time_against_reference(Contender(run(2.0)), {"a": Contender(run(1.0))}, repeats=4, warmup=0,
                                   reference_every=1, clock=lambda: now[0])
    assert timed.timings["a"].speedup == pytest.approx(2.0, rel=0.01)


def test_timing_noise_is_the_pooled_scatter_of_per_run_ratios():
    # "a" ran at 2x then 1.6x (one degree of freedom, log ratios ln 2 and ln 1.6); "b" at 3x twice (one, no
    # scatter); "c" once (none): the pooled sd is the root of (ln 1.25)^2 / 2 over two degrees of freedom
    timings = {"a": Timing([1.0, 1.25], [2.0, 2.0]), "b": Timing([1.0, 1.0], [3.0, 3.0]), "c": Timing([1.0], [2.0])}
    noise = timing_noise(timings)
    assert noise["ratio_sd"] == pytest.approx(math.log(1.25) / 2)
    assert noise["speedup_se"] == pytest.approx(math.log(1.25) / 2 / math.sqrt(2)) and noise["runs"] == 2
    assert noise["noisy"]
    steady = timing_noise({"a": Timing([1.0, 1.0, 1.01], [2.0, 2.0, 2.0])})
    assert steady["ratio_sd"] == pytest.approx(0.0057, abs=1e-4) and not steady["noisy"]
    assert timing_noise({"c": Timing([1.0], [2.0])}) is None


def test_rounds_are_added_while_the_timing_is_noisy_and_up_to_the_limit():
    def timed(a_costs, **kw):
        now, calls = [0.0], iter(a_costs * 10)

        def run(cost):
            def f():
                now[0] += cost() if callable(cost) else cost
            return f

        return time_against_reference(Contender(run(2.0)), {"a": Contender(run(lambda: next(calls)))}, repeats=2,
                                      warmup=0, reference_every=1, clock=lambda: now[0], **kw)

    noisy = timed([1.0, 1.5], max_repeats=5)  # ratios 2, 1.33, 2, ...: noisy until the limit
    assert len(noisy.timings["a"].seconds) == 5 and noisy.order == ["full"] + ["a", "full"] * 5
    steady = timed([1.0], max_repeats=5)  # one ratio throughout: the two rounds asked for
    assert len(steady.timings["a"].seconds) == 2 and steady.timings["a"].speedup == pytest.approx(2.0)
    assert len(timed([1.0, 1.5]).timings["a"].seconds) == 2  # no limit given: no more rounds
    assert len(timed([1.0, 1.5], max_repeats=1).timings["a"].seconds) == 2  # a limit below repeats does not cut


# --------------------------------------------------------------------------- eval


def test_all_compute_plan_reports_speedup_near_one_and_infinite_psnr(digits6):
    runner, sampler = digits6
    plan = plan_for_runner(runner, sampler, calib_seeds=[0, 1])
    seeds = list(range(EVAL_SEED_BASE, EVAL_SEED_BASE + 4))
    out = evaluate_plan(runner, sampler, plan, seeds, repeats=3, warmup=1)
    assert 0.5 < out["speedup"] < 2.0
    assert out["speedup_range"][0] <= out["speedup"] <= out["speedup_range"][1]
    assert math.isinf(out["psnr"]) and out["ssim"] == pytest.approx(1.0) and out["rel_l1"] == 0.0
    assert out["executor"]["computed_fraction"] == 1.0 and out["executor"]["fallbacks"] == 0
    assert out["meter"]["full"] == out["meter"]["plan"] and 0.0 <= out["meter"]["full"]["accuracy"] <= 1.0
    assert set(out["timing_noise"]) == {"ratio_sd", "speedup_se", "runs", "noisy"} and out["timing_noise"]["runs"] == 3
    md = eval_markdown(out)
    assert md.splitlines()[0].startswith("| run |") and "| inf |" in md and "digit accuracy" in md
    assert "uncertain by about" in md
    assert json_safe(out)["psnr"] == "inf"


def test_eval_cli_writes_json_markdown_and_png(digits6, cli, tmp_path):
    runner, sampler = digits6
    plan_path = save_plan(plan_for_runner(runner, sampler, {"transformer_blocks.3": "CDDCDD"}, calib_seeds=[0, 1]),
                          tmp_path / "plan.json")
    proc = cli("eval", "--plan", str(plan_path), "--seeds", "1000000..1000003", "--repeats", "1", "--json",
                "--out", "report.json", "--png", "grid.png", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert payload["plan"] == str(plan_path) and payload["model"] == "digits-dit" and payload["n"] == 4
    assert {"speedup", "speedup_range", "full_s", "plan_s", "psnr", "psnr_worst", "ssim", "rel_l1", "meter"} <= set(payload)
    assert 0 < payload["psnr"] < 200 and payload["executor"]["computed_fraction"] < 1.0
    assert json.loads((tmp_path / "report.json").read_text())["seeds"] == "1000000..1000003"
    md = (tmp_path / "report.md").read_text()
    assert "| plan (manual) |" in md and "| full compute |" in md
    lo, hi = payload["psnr_lo"], payload["psnr_hi"]
    assert lo <= payload["psnr"] <= hi and f"{payload['psnr']:.2f} ({lo:.2f}-{hi:.2f}) |" in md
    assert "90% bootstrap interval" in md
    assert payload["timing_noise"] is None and "uncertain" not in md  # one timed run: no scatter to read
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_against_another_plan_times_both_and_gives_the_paired_difference(digits6, cli, tmp_path):
    runner, sampler = digits6
    fast = save_plan(plan_for_runner(runner, sampler, {"transformer_blocks.3": "CDDCDD"}, calib_seeds=[0, 1]),
                     tmp_path / "fast.json")
    slow = save_plan(plan_for_runner(runner, sampler, {"transformer_blocks.3": "CCCCDD"}, calib_seeds=[0, 1]),
                     tmp_path / "slow.json")
    proc = cli("eval", "--plan", str(slow), "--against", str(fast), "--seeds", "1000000..1000003", "--repeats", "2",
               "--json", "--out", "report.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    other, comparison = payload["against"], payload["comparison"]
    assert other["plan"] == str(fast) and other["repeats"] == payload["repeats"] == 2
    assert other["executor"]["computed_fraction"] < payload["executor"]["computed_fraction"] < 1.0
    assert comparison["difference"] == pytest.approx(payload["psnr"] - other["psnr"])
    assert comparison["interval"][0] <= comparison["difference"] <= comparison["interval"][1]
    assert set(payload["meter"]) == {"full", "plan"} and set(other["meter"]) == set(payload["meter"]["full"])
    md = (tmp_path / "report.md").read_text()
    assert "| against (manual) |" in md and "paired bootstrap interval" in md
    # a plan for another sampler is refused in one line before anything is timed
    other_steps = save_plan(plan_for_runner(runner, runner.resolve(Sampler("ddim", 4, 3.0)), calib_seeds=[0, 1]),
                            tmp_path / "four.json")
    proc = cli("eval", "--plan", str(slow), "--against", str(other_steps), "--seeds", "1000000..1000001", cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "step" in proc.stderr


# --------------------------------------------------------------------------- peers


def test_peers_are_skipped_with_a_clear_message_when_the_extra_is_missing(digits6, monkeypatch):
    runner, sampler = digits6
    monkeypatch.setitem(sys.modules, "cache_dit", None)  # makes `import cache_dit` raise ImportError
    runs, skipped = peer_runs(runner, sampler, ["cache-dit-dbcache", "cache-dit-dbcache-taylorseer"],
                              {"cache-dit-dbcache": [0.1], "cache-dit-dbcache-taylorseer": [0.1]})
    assert runs == []
    assert set(skipped) == {"cache-dit-dbcache", "cache-dit-dbcache-taylorseer"}
    for why in skipped.values():
        assert "cache-dit is not installed" in why and "pip install 'dit-cache-planner[bench]'" in why
        assert "\n" not in why


@pytest.mark.parametrize("peer, value", [("diffusers-fbcache", 0.3), ("diffusers-taylorseer", 2),
                                         ("cache-dit-dbcache", 0.3), ("cache-dit-dbcache-taylorseer", 0.3)])
def test_peers_run_for_real_on_their_own_copy(digits6, peer, value):
    if peer.startswith("cache-dit"):
        pytest.importorskip("cache_dit")
    runner, sampler = digits6
    sampler = runner.resolve(Sampler("ddim", 20, 3.0))  # enough steps for cache-dit's 8 warm-up steps
    seeds = [EVAL_SEED_BASE, EVAL_SEED_BASE + 1]
    conditions = runner.conditions(2, seed=seeds[0])
    before = runner.run(conditions, seeds, sampler)
    warmups = {peer: [2]} if peer in WARMUP_KNOBS else None  # one warm-up each, not TaylorSeer's default three
    runs, skipped = peer_runs(runner, sampler, [peer], {peer: [value]}, warmups)
    assert not skipped and len(runs) == 1 and runs[0].method == peer
    assert ("warmup=2" in runs[0].setting) == (warmups is not None)
    first = runs[0].run(conditions, seeds, sampler)
    again = runs[0].run(conditions, seeds, sampler)
    assert torch.equal(first, again)  # the peer's state is reset between calls
    assert torch.isfinite(first).all() and not torch.equal(first, before)  # it cached something
    assert (first - before).abs().mean() < 0.2  # and still draws the same digits
    assert torch.equal(runner.run(conditions, seeds, sampler), before)  # the original model is untouched
    assert not hasattr(runner.transformer, "_diffusers_hook") and not hasattr(type(runner.pipe), "_is_cached")


def test_taylorseer_traces_each_warm_up_with_each_interval(digits6):
    runner, sampler = digits6
    sampler = runner.resolve(Sampler("ddim", 12, 3.0))
    seeds = [EVAL_SEED_BASE]
    conditions = runner.conditions(1, seed=seeds[0])
    runs, _ = peer_runs(runner, sampler, ["diffusers-taylorseer"], {"diffusers-taylorseer": [2, 3]})
    warmups = DEFAULT_WARMUPS["diffusers-taylorseer"]
    assert [r.setting for r in runs] == [f"cache_interval={i} warmup={w}" for w in warmups for i in (2, 3)]
    outputs = [r.run(conditions, seeds, sampler) for r in runs]
    assert not torch.equal(outputs[0], outputs[2])  # interval 2 at warm-ups 1 and 3: the warm-up reached the hook


def test_magcache_warm_up_is_its_retained_share_of_the_steps(digits6):
    from planner.bench.peers import _diffusers_config, _diffusers_hooks

    runner, sampler = digits6
    d, sampler = _diffusers_hooks(), runner.resolve(sampler)
    shared = {"mag_ratios": [1.0] * sampler.steps}
    config, _ = _diffusers_config(d, "diffusers-magcache", 0.1, 2, runner, sampler, None, shared, runner)
    assert config.retention_ratio == pytest.approx(2 / sampler.steps)
    config, _ = _diffusers_config(d, "diffusers-magcache", 0.1, None, runner, sampler, None, shared, runner)
    assert config.retention_ratio == d.MagCacheConfig(mag_ratios=[1.0], num_inference_steps=1).retention_ratio


def test_peer_and_param_flags_refuse_bad_input():
    assert parse_sweeps(["diffusers-fbcache=0.05,0.1"]) == {"diffusers-fbcache": [0.05, 0.1]}
    for bad in (["nope=1"], ["diffusers-fbcache"], ["diffusers-fbcache=a"], ["diffusers-taylorseer=2.5"],
                ["diffusers-fbcache=nan"], ["diffusers-fbcache=inf"]):
        with pytest.raises(PlannerError):
            parse_sweeps(bad)
    assert parse_warmups(["diffusers-taylorseer=1,3", "cache-dit-dbcache=2"]) == {
        "diffusers-taylorseer": [1, 3], "cache-dit-dbcache": [2]}
    for bad in (["diffusers-fbcache=1"], ["diffusers-taylorseer=0"], ["diffusers-magcache=1.5"], ["nope=1"]):
        with pytest.raises(PlannerError):
            parse_warmups(bad)
    assert parse_strategy_params(["l2c:iterations=200", "uniform:level=block"]) == {
        "l2c": {"iterations": 200}, "uniform": {"level": "block"}}
    with pytest.raises(PlannerError, match="STRATEGY:KEY=VALUE"):
        parse_strategy_params(["iterations=200"])
    with pytest.raises(PlannerError, match="unknown peer"):
        peer_runs(None, None, ["no-such-peer"])
    assert len(PEERS) == 11


# --------------------------------------------------------------------------- bench


def test_quality_at_matched_speedup_interpolates_on_the_pareto_front():
    points = [(1.5, 40.0), (2.5, 30.0), (2.0, 20.0), (1.2, 39.0)]  # (2.0, 20) and (1.2, 39) are dominated
    assert pareto_front(points) == [(1.5, 40.0), (2.5, 30.0)]
    assert quality_at(points, 2.0) == pytest.approx(35.0)
    assert quality_at(points, 1.1) == 40.0  # every front point is faster: the slowest one
    assert quality_at(points, 2.7) is None  # never measured that fast: no extrapolation
    assert quality_at([], 2.0) is None


@pytest.fixture(scope="module")
def tiny_profile(digits6, tmp_path_factory):
    runner, sampler = digits6
    out = tmp_path_factory.mktemp("profile") / "digits"
    profile_model(runner, sampler, samples=2, lags=2, costs="flops", out=out)
    return out


def test_bench_on_a_tiny_setting_writes_table_plot_and_environment(tiny_profile, cli, tmp_path):
    proc = cli("bench", "--steps", str(STEPS), "--budgets", "2x,50x", "--strategies", "uniform",
                "--param", "uniform:level=block", "--peers", "diffusers-fbcache", "--sweep", "diffusers-fbcache=0.2,0.5",
                "--seeds", "1000000..1000003", "--repeats", "1", "--calib-samples", "2", "--profile", str(tiny_profile),
                "--threads", "1", "--out", "out", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    out = tmp_path / "out"
    assert {Path(f).name for f in payload["files"].values()} == {
        "results.csv", "results.md", "results.json", "pareto.png", "environment.json"}
    rows = {(r["method"], r["setting"]): r for r in payload["rows"]}
    assert rows[("no cache", f"{STEPS} steps")]["psnr"] == "inf"
    uniform = rows[("uniform", "2x")]
    assert uniform["status"] == "ok" and uniform["speedup"] > 0 and 0 < uniform["psnr"] < 200
    assert (out / "plans" / "uniform-2x.json").is_file() and uniform["plan"].endswith("uniform-2x.json")
    assert "cannot be met" in rows[("uniform", "50x")]["status"] and rows[("uniform", "50x")]["speedup"] is None
    assert rows[("fewer steps", "3 steps")]["budget"] == "2x"
    assert {k for k in rows if k[0] == "diffusers-fbcache"} == {("diffusers-fbcache", "threshold=0.2"),
                                                               ("diffusers-fbcache", "threshold=0.5")}
    import pandas as pd

    csv = pd.read_csv(out / "results.csv")
    assert list(csv.columns[:6]) == ["method", "kind", "setting", "budget", "status", "speedup"] and len(csv) == len(rows)
    md = (out / "results.md").read_text()
    assert "| method | kind | 2x | 50x |" in md and "| uniform | baseline |" in md
    assert 0 < csv["psnr_lo"].iloc[1] <= csv["psnr"].iloc[1] <= csv["psnr_hi"].iloc[1]
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    env = json.loads((out / "environment.json").read_text())
    assert env["torch_threads"] == 1 and env["device"] == "cpu" and env["versions"]["diffusers"]
