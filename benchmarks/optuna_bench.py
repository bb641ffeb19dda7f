"""Benchmark of the ``optuna`` strategy (issue 6), on digits-dit with DDIM-50 at guidance 3.

One in-memory study of ``--n-trials`` trials at ``--budget`` (default 100 at 2x) on 8 calibration
samples: its time, the chosen plan's predicted speedup and calibration error, whether each baseline
(``uniform``, ``smoothcache`` at the same budget, and ``greedy``) is dominated by the Pareto front,
and ``uniform`` at the other budgets too; then greedy vs optuna side by side: time to plan,
calibration error, and on held-out seeds (``planner.evaluate.verify_plan``, seeds from 1,000,000)
realized speedup, PSNR and SSIM against full compute. The targets: 100 trials in under 5 minutes
on 2 CPU cores, the plan meets the budget, the front dominates uniform and smoothcache.

    python benchmarks/optuna_bench.py [--budget 2x] [--n-trials 100] [--sampler nsga2] [--seed 0]
                                      [--out out/optuna_bench] [--threads 2] [--json]

The front folder (plans, front.json, trials.csv) and its plot ``front.png`` go to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _results import finish  # noqa: E402

PROFILE = ROOT / "profiles" / "digits-dit_ddim50_g3_cpu"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default=str(PROFILE))
    ap.add_argument("--budget", default="2x")
    ap.add_argument("--n-trials", type=int, default=100)
    ap.add_argument("--sampler", default="nsga2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="more optuna params")
    ap.add_argument("--other-budgets", default="1.5x,3x", help="uniform at these budgets, checked against the front")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--verify-samples", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side in verify_plan")
    ap.add_argument("--no-greedy", action="store_true", help="skip the greedy side of the comparison")
    ap.add_argument("--out", default=str(ROOT / "out" / "optuna_bench"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--results", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)

    import torch

    from planner.commands.search import parse_params
    from planner.errors import PlannerError
    from planner.evaluate import verify_plan
    from planner.profile import load_profile
    from planner.runner import Sampler, load_runner
    from planner.search import make_strategy
    from planner.search.api import search_plan
    from planner.search._pareto import Point, dominating, load_front, plot_front
    from planner.search.budget import Budget
    from planner.search.context import SearchContext

    torch.set_num_threads(args.threads)
    profile = load_profile(args.profile)
    runner = load_runner(profile.meta.model_spec)
    sampler = Sampler("ddim", profile.meta.steps, profile.meta.sampler.guidance)
    out = Path(args.out)
    context = SearchContext.build(runner, sampler, profile, samples=args.calib_samples, artifacts=out)
    budget = Budget.parse(args.budget)

    params = {"n_trials": args.n_trials, "sampler": args.sampler, "seed": args.seed, **parse_params(args.param)}
    start = time.perf_counter()
    strategy = make_strategy("optuna", params)
    plan = search_plan(None, budget, strategy=strategy, context=context)
    optuna_s = time.perf_counter() - start
    doc = load_front(out)
    png = plot_front(doc, out / "front.png", out / "trials.csv")
    front = [Point(p["fraction"], p["error"]) for p in doc["points"]]
    trials_s = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in strategy.study.trials
                   if t.datetime_complete is not None)

    def point_row(name, label, p):
        i = dominating(front, Point(p.latency_fraction, p.calib_error))
        return {"name": name, "budget": label, "predicted_speedup": p.speedup, "calib_error": p.calib_error,
                "dominated_by": None if i is None else doc["points"][i]["trial"]}

    plans = {"optuna": (plan, optuna_s)}
    points = [point_row(b["name"], budget.label(), _prediction(b)) for b in doc["baselines"] if "failed" not in b]
    for label in [b for b in args.other_budgets.split(",") if b]:
        try:
            other = search_plan(None, label, strategy="uniform", context=context)
            points.append(point_row("uniform", label, other.prediction))
        except PlannerError as e:
            print(f"uniform {label}: {e}", file=sys.stderr)
    if not args.no_greedy:
        start = time.perf_counter()
        greedy = search_plan(None, budget, strategy="greedy", context=context)
        plans["greedy"] = (greedy, time.perf_counter() - start)
        points.append(point_row("greedy", budget.label(), greedy.prediction))

    side = []
    for name, (p, seconds) in plans.items():
        v = verify_plan(runner, sampler, p, samples=args.verify_samples, repeats=args.repeats)
        side.append({"strategy": name, "search_s": round(seconds, 1), "predicted_speedup": p.prediction.speedup,
                     "meets_budget": budget.met(p.prediction.speedup, p.prediction.calib_error),
                     "calib_error": p.prediction.calib_error, "realized_speedup": v["speedup"],
                     "realized_range": v["speedup_range"], "psnr": v["psnr"], "ssim": v["ssim"]})
        print(f"{name}: {seconds:.1f} s, {p.prediction.speedup:.2f}x predicted, err {p.prediction.calib_error:.4f}, "
              f"{v['speedup']:.2f}x realized, {v['psnr']:.2f} dB", file=sys.stderr)
    result = {
        "budget": budget.label(), "n_trials": args.n_trials, "sampler": args.sampler, "seed": args.seed,
        "search_s": round(optuna_s, 1), "trials_s": round(trials_s, 1),
        "trials_complete": plan.provenance.params["trials_complete"], "front_points": len(front),
        "chosen": {k: plan.provenance.params[k] for k in plan.provenance.params if k not in ("storage", "study")},
        "points": points, "side_by_side": side, "front": str(out), "plot": str(png),
    }
    def render():
        print(f"optuna, {args.n_trials} trials ({args.sampler}, seed {args.seed}) at {budget.label()}: {optuna_s:.1f} s in all "
              f"({trials_s:.1f} s in trials), front of {len(front)} points -> {png}")
        print()
        print("| baseline | budget | predicted | calib err | dominated by front point |")
        print("|---|---|---|---|---|")
        for r in points:
            by = "no" if r["dominated_by"] is None else f"trial {r['dominated_by']}"
            print(f"| {r['name']} | {r['budget']} | {r['predicted_speedup']:.2f}x | {r['calib_error']:.4f} | {by} |")
        print()
        print("| strategy | search s | predicted | calib err | realized speedup | PSNR dB | SSIM |")
        print("|---|---|---|---|---|---|---|")
        for r in side:
            print(f"| {r['strategy']} | {r['search_s']:.1f} | {r['predicted_speedup']:.2f}x{'' if r['meets_budget'] else ' (missed)'}"
                  f" | {r['calib_error']:.4f} | {r['realized_speedup']:.2f}x ({r['realized_range'][0]:.2f}-{r['realized_range'][1]:.2f})"
                  f" | {r['psnr']:.2f} | {r['ssim']:.4f} |")

    return finish("optuna", result, render, args.json, args.results)


def _prediction(baseline: dict):
    """A front.json baseline entry in the shape of a plan's prediction."""
    from types import SimpleNamespace

    return SimpleNamespace(speedup=baseline["speedup"], latency_fraction=baseline["fraction"], calib_error=baseline["error"])


if __name__ == "__main__":
    sys.exit(main())
