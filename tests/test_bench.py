"""Tests of the bench across models: FLOP counts of what actually ran, quality at matched speed and the
margins of our best strategy, the baselines' level choice, every peer tool on digits-dit (or its
reason for being unavailable), a clone of a Runner keeping its options, and a two-model bench run on
tiny settings writing its per-model tables and the summary. No assertion reads a wall-clock time."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from planner.bench.flops import count_flops, flop_speedup
from planner.bench.margins import margins, quality_at, worst_case
from planner.bench.peers import PEERS, clone_runner, peer_runs
from planner.executor import apply_plan
from planner.plan import plan_for_runner
from planner.runner import Sampler
from planner.seeds import EVAL_SEED_BASE

TORCH_THREADS = 1  # see conftest.py
SEEDS = [EVAL_SEED_BASE, EVAL_SEED_BASE + 1]


# --------------------------------------------------------------------------- FLOPs


def test_flop_speedup_of_a_block_skipping_plan_exceeds_one_and_full_compute_is_one(digits):
    sampler = digits.resolve(Sampler("ddim", 6, 3.0))
    conditions = digits.conditions(2, seed=SEEDS[0])

    def run():
        return digits.run(conditions, SEEDS, sampler)

    full, _ = count_flops(run)
    identity = plan_for_runner(digits, sampler, {})
    same, _ = count_flops(run, lambda: apply_plan(digits.pipe, identity))
    blocks = [m.name for m in digits.modules() if m.kind == "block"]
    skipping = plan_for_runner(digits, sampler, {b: "CDCDCD" for b in blocks[1:]})
    fewer, out = count_flops(run, lambda: apply_plan(digits.pipe, skipping))
    assert full > 0 and flop_speedup(full, same) == 1.0
    assert flop_speedup(full, fewer) > 1.5  # 7 of 8 blocks skip 3 of 6 steps
    assert torch.isfinite(out).all()
    assert flop_speedup(full, 0) is None and flop_speedup(None, 5) is None


def test_operator_flops_agree_with_flop_counter_mode(digits):
    sampler = digits.resolve(Sampler("ddim", 2, 3.0))
    conditions = digits.conditions(2, seed=SEEDS[0])
    light, a = count_flops(lambda: digits.run(conditions, SEEDS, sampler))
    exact, b = count_flops(lambda: digits.run(conditions, SEEDS, sampler), exact=True)
    assert light == exact > 0 and torch.equal(a, b)


# --------------------------------------------------------------------------- matching and margins


def _row(method, kind, speedup, psnr, flop=None):
    return {"method": method, "kind": kind, "speedup": speedup, "flop_speedup": flop or speedup, "psnr": psnr}


def test_quality_at_reads_the_front_without_extrapolating():
    pts = [(1.4, 45.0), (2.2, 37.0), (3.1, 30.0)]
    assert quality_at(pts, 1.8) == pytest.approx(41.0)
    assert quality_at(pts, 1.2) == 45.0  # all faster: the slowest
    assert quality_at(pts, 3.5) is None  # never that fast
    assert quality_at([(1.0, math.inf), (2.0, 40.0)], 1.5) == 40.0  # an identical run never inflates a match


def test_margins_take_the_best_of_ours_against_each_side_and_the_worst_model():
    rows = [{"method": "no cache", "kind": "reference", "speedup": 1.0, "flop_speedup": 1.0, "psnr": math.inf},
            _row("greedy", "ours", 1.5, 44.0), _row("greedy", "ours", 2.0, 40.0),
            _row("l2c", "ours", 1.5, 46.0), _row("l2c", "ours", 2.0, 39.0),
            _row("fewer steps", "baseline", 1.5, 41.0), _row("fewer steps", "baseline", 2.0, 38.0),
            _row("uniform", "baseline", 2.0, 45.0),  # a baseline never counts as ours
            _row("diffusers-taylorseer", "peer", 1.5, 43.0), _row("diffusers-taylorseer", "peer", 2.0, 41.5),
            _row("diffusers-fbcache", "peer", 1.6, 42.0)]
    m = margins(rows, [1.5, 2.0, 3.0])
    at15, at2, at3 = (m["speedup"][k] for k in ("1.5x", "2x", "3x"))
    assert at15["ours"] == {"method": "l2c", "psnr": 46.0}
    assert at15["margin_peer"] == pytest.approx(3.0) and at15["margin_fewer_steps"] == pytest.approx(5.0)
    assert at15["margin_greedy"] == pytest.approx(2.0)
    assert at2["ours"]["method"] == "greedy" and at2["margin_peer"] == pytest.approx(-1.5)
    assert at2["margin_greedy"] == 0.0
    assert at3["ours"]["psnr"] is None and at3["margin_peer"] is None
    assert set(m) == {"speedup", "flop_speedup"}
    better = margins([_row("greedy", "ours", 2.0, 50.0), _row("diffusers-taylorseer", "peer", 2.0, 41.0)], [2.0])
    worst = worst_case({"a": m, "b": better})
    assert worst["speedup"]["2x"]["margin_peer"] == {"worst": pytest.approx(-1.5), "model": "a", "missing": []}
    assert worst["speedup"]["2x"]["margin_fewer_steps"]["missing"] == ["b"]


def test_margin_intervals_pair_the_methods_on_the_same_images():
    import torch

    from planner.bench.margins import margin_text, margins_markdown

    # images that differ by three orders of magnitude in how hard they are, for both methods alike; ours halves
    # every image's error: 3 dB better whatever the draw, though each method's own PSNR moves by several dB
    hard = torch.logspace(-7, -4, 64, dtype=torch.float64)
    rows = [_row("greedy", "ours", 2.0, 10 * math.log10(1 / (hard / 2).mean().item())),
            _row("diffusers-taylorseer", "peer", 2.0, 10 * math.log10(1 / hard.mean().item())),
            _row("diffusers-fbcache", "peer", 1.4, 60.0)]  # not scored: its PSNR stays, and it cannot reach 2x
    m = margins(rows, [2.0, 3.0], [hard / 2, hard, None])
    at2 = m["speedup"]["2x"]
    assert at2["margin_peer"] == pytest.approx(10 * math.log10(2))
    assert at2["margin_peer_interval"] == pytest.approx([10 * math.log10(2)] * 2)
    assert "margin_fewer_steps_interval" not in at2 and "margin_peer_interval" not in m["speedup"]["3x"]
    assert margin_text(at2, "margin_peer") == "+3.01 (+3.01 to +3.01)" and margin_text(at2, "margin_fewer_steps") == ""
    # ours far worse on the one image that weighs most, better on the rest: the draws disagree on the sign
    uneven = hard / 2
    uneven[-1] = hard[-1] * 4
    rows[0] = _row("greedy", "ours", 2.0, 10 * math.log10(1 / uneven.mean().item()))
    lo, hi = margins(rows, [2.0], [uneven, hard, None])["speedup"]["2x"]["margin_peer_interval"]
    assert lo < 0 < hi
    # the worst case across models carries its model's interval into the summary
    worst = worst_case({"a": m, "b": margins(rows, [2.0, 3.0])})
    assert worst["speedup"]["2x"]["margin_peer"]["model"] == "b"
    assert "worst_interval" not in worst["speedup"]["2x"]["margin_peer"]  # b was not given its images' errors
    worst = worst_case({"a": m})
    assert worst["speedup"]["2x"]["margin_peer"]["worst_interval"] == pytest.approx([10 * math.log10(2)] * 2)
    assert "+3.01 (+3.01 to +3.01) (a)" in margins_markdown({"a": m}, worst)


# --------------------------------------------------------------------------- baselines


@pytest.mark.parametrize("strategy", ["uniform", "smoothcache"])
def test_auto_level_keeps_the_better_level_on_the_calibration_inputs(digits10, strategy):
    from planner.search.api import search_plan
    from planner.search.context import SearchContext

    context = SearchContext.build(digits10.runner, digits10.sampler, digits10.profile, samples=2, progress=False)
    errors = {}
    for level in ("sublayer", "block"):
        try:
            errors[level] = search_plan(None, "1.5x", strategy=strategy, context=context, level=level).prediction.calib_error
        except Exception:  # noqa: BLE001 - a level that cannot meet the budget drops out
            pass
    assert errors
    auto = search_plan(None, "1.5x", strategy=strategy, context=context)
    assert auto.prediction.calib_error == pytest.approx(min(errors.values()))
    assert auto.provenance.params["level"] == min(errors, key=errors.get)


# --------------------------------------------------------------------------- peers


def test_a_clone_keeps_the_runners_options(digits):
    runner = digits.with_pipe(digits.pipe)
    runner.call_args = {"x": 1}
    runner.negative_prompt = "blurry"
    runner.default_sampler = Sampler("ddim", 7, 2.0)
    clone = clone_runner(runner)
    assert clone.pipe is not runner.pipe and clone.transformer is not runner.transformer
    for attr in ("spec", "meter", "call_args", "negative_prompt", "default_sampler", "class_labels", "family"):
        assert getattr(clone, attr) == getattr(runner, attr), attr
    assert clone._prompts == runner._prompts


NEW_PEERS = {"diffusers-magcache": 0.1, "diffusers-pab": 2, "diffusers-fastercache": 2,
             "cache-dit-dbcache-F2B1": 0.3, "cache-dit-dbcache-F2B1-taylorseer": 0.3,
             "cache-dit-dbcache-F4B0": 0.3, "cache-dit-dbcache-F4B0-taylorseer": 0.3}


def test_every_peer_has_a_default_sweep():
    from planner.bench.peers import DEFAULT_SWEEPS

    assert set(NEW_PEERS) <= set(PEERS) and set(DEFAULT_SWEEPS) == set(PEERS)


# two peers (one per library) in the default run, every one in CI (pytest --slow)
@pytest.mark.parametrize("peer", [p if p in ("diffusers-magcache", "cache-dit-dbcache-F2B1") else
                                  pytest.param(p, marks=pytest.mark.slow) for p in sorted(NEW_PEERS)])
def test_each_new_peer_runs_on_digits_dit_and_saves_flops(digits, peer):
    if peer.startswith("cache-dit"):
        pytest.importorskip("cache_dit")
    sampler = digits.resolve(Sampler("ddim", 20, 3.0))  # enough steps for cache-dit's 8 warm-up steps
    conditions = digits.conditions(2, seed=SEEDS[0])
    full, before = count_flops(lambda: digits.run(conditions, SEEDS, sampler))
    runs, skipped = peer_runs(digits, sampler, [peer], {peer: [NEW_PEERS[peer]]}, calib_samples=2)
    if skipped:  # unavailable: a one-line reason naming the peer
        assert set(skipped) == {peer} and peer in skipped[peer] and "\n" not in skipped[peer]
        return
    assert len(runs) == 1 and runs[0].method == peer
    used, first = count_flops(lambda: runs[0].run(conditions, SEEDS, sampler))
    again = runs[0].run(conditions, SEEDS, sampler)
    assert torch.equal(first, again)  # the peer's state is reset between calls
    assert torch.isfinite(first).all() and (first - before).abs().mean() < 0.2
    assert flop_speedup(full, used) > 1.0  # it skipped work
    assert torch.equal(digits.run(conditions, SEEDS, sampler), before)  # the original model is untouched


def test_peers_that_cannot_drive_a_model_say_why(digits):
    sampler = digits.resolve(Sampler("ddim", 4, 3.0))
    pytest.importorskip("cache_dit")
    shallow = copy.copy(digits)
    four_blocks = [m for m in digits.modules() if m.kind == "block"][:4]
    shallow.modules = lambda: four_blocks  # as a 4-block model: F4B0 leaves nothing to cache
    runs, skipped = peer_runs(shallow, sampler, ["cache-dit-dbcache-F4B0"], {"cache-dit-dbcache-F4B0": [0.3]})
    assert runs == [] and "computes all 4 blocks" in skipped["cache-dit-dbcache-F4B0"]


# --------------------------------------------------------------------------- the bench over models


@pytest.mark.slow  # a bench over two models: CI runs it (pytest --slow)
def test_bench_over_two_models_writes_per_model_tables_and_a_summary(cli, tmp_path):
    proc = cli("bench", "--models", "digits-dit,tiny:dit", "--steps", "6", "--budgets", "1.2x,2x",
               "--strategies", "greedy,uniform", "--peers", "diffusers-fbcache", "--sweep", "diffusers-fbcache=0.2,0.5",
               "--seeds", "1000000..1000003", "--repeats", "1", "--warmup", "0", "--calib-samples", "2",
               "--threads", "1", "--out", "suite", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    out = tmp_path / "suite"
    assert set(payload["models"]) == {"digits-dit", "tiny:dit"}
    for model, folder in (("digits-dit", "digits-dit"), ("tiny:dit", "tiny-dit")):
        for name in ("results.csv", "results.md", "results.json", "pareto.png", "environment.json"):
            assert (out / folder / name).is_file(), (model, name)
        result = json.loads((out / folder / "results.json").read_text())
        rows = {(r["method"], r["setting"]): r for r in result["rows"]}
        assert rows[("no cache", "6 steps")]["flop_speedup"] == 1.0
        for r in result["rows"]:
            for key in ("psnr", "psnr_mean", "psnr_p5", "psnr_worst", "ssim", "flop_speedup"):
                assert key in r
        assert set(result["margins"]) == {"speedup", "flop_speedup"}
        # every margin that exists has its bootstrap interval over the held-out images, in the JSON and the table
        given = [(e[k], e[f"{k}_interval"]) for per in result["margins"].values() for e in per.values() for k in e
                 if k.startswith("margin_") and not k.endswith("_interval") and e[k] is not None]
        assert given and all(lo <= value <= hi for value, (lo, hi) in given)
        md = (out / folder / "results.md").read_text()
        assert "At matched FLOP speedup" in md and "| PSNR pooled | mean | p5 | worst |" in md
        assert "bootstrap interval of each margin" in md
    digits_rows = {(r["method"], r["setting"]): r
                   for r in json.loads((out / "digits-dit" / "results.json").read_text())["rows"]}
    assert digits_rows[("fewer steps", "3 steps")]["flop_speedup"] == pytest.approx(2.0, rel=1e-6)
    assert "accuracy" in digits_rows[("no cache", "6 steps")] and "frechet" in digits_rows[("no cache", "6 steps")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"] == ["digits-dit", "tiny:dit"] and "pooled" in summary["metric"]
    for axis in ("speedup", "flop_speedup"):
        for label in ("1.2x", "2x"):
            entry = summary["worst_case"][axis][label]
            assert set(entry) == {"margin_peer", "margin_fewer_steps", "margin_greedy"}
            for e in entry.values():
                assert set(e) - {"worst_interval"} == {"worst", "model", "missing"}
                assert e["worst"] is not None or e["missing"]
                if e["worst"] is not None:
                    assert e["worst_interval"][0] <= e["worst"] <= e["worst_interval"][1]
    assert "pooled PSNR" in (out / "summary.md").read_text()


def test_models_flag_refuses_bad_lists(cli, tmp_path):
    for models, words in (("", "names no model"), ("digits-dit,digits-dit", "twice")):
        proc = cli("bench", "--models", models, cwd=tmp_path)
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("bench", "--models", "digits-dit,tiny:dit", "--profile", "p", cwd=tmp_path)
    assert proc.returncode == 2 and "--profile" in proc.stderr
    assert not any(Path(tmp_path).iterdir())


def test_a_method_that_crashes_becomes_a_failed_row_and_the_bench_goes_on(digits):
    from planner.bench.run import KIND_PEER, BenchConfig, Point, _rows, _time_all

    sampler = digits.resolve(Sampler("ddim", 2, 3.0))
    conditions = digits.conditions(2, seed=SEEDS[0])

    def crash(conditions, seeds):
        raise RuntimeError("shape mismatch\nin a hook")

    points = [Point("broken", KIND_PEER, "x=1", draw=crash),
              Point("fewer", KIND_PEER, "1 step",
                    draw=lambda c, s: digits.run(c, s, digits.resolve(Sampler("ddim", 1, 3.0))))]
    config = BenchConfig(repeats=1, warmup=0, progress=False)
    timed, full_flops = _time_all(digits, sampler, conditions, SEEDS, points, config)
    rows = {r["method"]: r for r in _rows(digits, conditions, points, timed, timed.outputs, sampler, full_flops)}
    assert rows["broken"]["status"] == "failed: RuntimeError: shape mismatch in a hook"
    assert rows["broken"]["speedup"] is None and rows["broken"]["psnr"] is None
    assert rows["fewer"]["status"] == "ok" and rows["fewer"]["flop_speedup"] == pytest.approx(2.0)


def test_quality_is_scored_on_every_seed_and_speed_timed_on_the_first_ones(digits):
    """With ``timed_seeds`` the timer runs the first seeds and the PSNR comes from all of them: the fewer-steps
    row's pooled PSNR is the one of the four images, not of the two timed."""
    from planner.bench.run import BenchConfig, run_bench
    from planner.errors import PlannerError
    from planner.metrics import per_image_mse, psnr_summary

    sampler = digits.resolve(Sampler("ddim", 4, 3.0))
    seeds = [EVAL_SEED_BASE + i for i in range(4)]
    config = BenchConfig(budgets=["2x"], strategies=[], peers=[], seeds=seeds, timed_seeds=2, repeats=2, warmup=0,
                         progress=False)
    result = run_bench(digits, sampler, config)
    row = next(r for r in result.rows if r["method"] == "fewer steps")
    conditions = digits.conditions(4, seed=seeds[0])
    full = digits.run(conditions, seeds, sampler)
    fewer = digits.run(conditions, seeds, digits.resolve(Sampler("ddim", 2, 3.0)))
    assert row["psnr"] == pytest.approx(psnr_summary(fewer, full)["psnr"], abs=1e-4)
    # the margins' intervals draw on each row's own images: all four, in seed order
    assert result.image_mse[result.rows.index(row)].tolist() == pytest.approx(per_image_mse(fewer, full).tolist(), abs=1e-8)
    assert row["psnr"] != pytest.approx(psnr_summary(fewer[:2], full[:2])["psnr"], abs=1e-4)
    assert row["speedup"] > 0 and result.info["timed_seeds"] == 2 and result.info["n"] == 4
    assert result.info["timing_noise"]["runs"] == 2 and "load_before" in result.info["timing_noise"]
    with pytest.raises(PlannerError, match="timed seeds"):
        run_bench(digits, sampler, BenchConfig(strategies=[], peers=[], seeds=seeds, timed_seeds=5, progress=False))


def test_reports_state_the_timing_noise_and_flag_a_noisy_run():
    from planner.bench.report import noise_summary, noise_text

    steady = {"ratio_sd": 0.02, "speedup_se": 0.012, "runs": 3, "noisy": False, "load_before": 1.0,
              "load_after": 1.2, "cpus": 2}
    noisy = {**steady, "ratio_sd": 0.12, "speedup_se": 0.069, "noisy": True, "load_before": None}
    assert noise_text(steady).startswith("Timing noise: one run's speed ratio scattered by 2.0%")
    assert "uncertain by about 1.2%" in noise_text(steady) and "load average 1.0 before" in noise_text(steady)
    assert "Noisy" not in noise_text(steady)
    assert noise_text(noisy).startswith("**Noisy timing.**") and "6.9%" in noise_text(noisy)
    assert "load average" not in noise_text(noisy) and "FLOP axis" in noise_text(noisy)
    line = noise_summary({"a": steady, "b": noisy, "c": None})
    assert "a 1.2%" in line and "b 6.9% (noisy)" in line and "c " not in line
    assert noise_summary({"c": None}) == ""


def test_top_up_searches_again_where_the_plan_for_the_largest_budget_ran_below_it():
    """A plan searched on measured costs for the largest budget that ran slower is searched again with the budget
    raised by the shortfall; FLOP-costed plans, smaller budgets, plans that reached it and top-ups whose search
    failed are left out. The timings are given, not measured."""
    from types import SimpleNamespace

    from planner.bench.run import KIND_OURS, BenchConfig, Point, _top_up_points

    asked = []

    def again(method, ok=True):
        def search(budget):
            asked.append((method, budget.speedup))
            return Point(method, KIND_OURS, budget.label(), budget=budget.label(), draw=print if ok else None)
        return search

    def point(method, setting, predicted, ok=True, measured=True):
        return Point(method, KIND_OURS, setting, budget=setting.split()[0], predicted_speedup=predicted,
                     search_again=again(method, ok) if measured else None)

    points = [point("greedy", "2x", 2.0), point("greedy", "3x", 3.06),
              point("greedy", "3x FLOPs", 3.12, measured=False), point("optuna", "3x", 3.0),
              point("l2c", "3x", 3.0, ok=False)]
    speedups = {"greedy | 2x": 1.9, "greedy | 3x": 2.91, "greedy | 3x FLOPs": 2.5, "optuna | 3x": 3.05,
                "l2c | 3x": 2.5}
    timed = SimpleNamespace(timings={k: SimpleNamespace(speedup=v) for k, v in speedups.items()})

    top_ups = _top_up_points(points, timed, BenchConfig(budgets=["1.5x", "2x", "3x"], progress=False))

    assert asked == [("greedy", round(3.06 * 3 / 2.91, 2)), ("l2c", 3.6)]
    assert [p.key for p in top_ups] == ["greedy | 3.15x (top-up for 3x)"]
    asked.clear()
    top_ups = _top_up_points(points, timed, BenchConfig(budgets=["1.5x", "2x"], progress=False))
    assert asked == [("greedy", round(2.0 * 2 / 1.9, 2))] and [p.setting for p in top_ups] == ["2.11x (top-up for 2x)"]
