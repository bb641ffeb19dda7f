"""Benchmark of the plan search (issue 5), on digits-dit with DDIM-50 at guidance 3.

For each budget (default 1.5x, 2x, 3x) and strategy (greedy, uniform, smoothcache): search time,
predicted speedup and calibration error (relative L1 of the final latents against full compute,
8 calibration samples, seeds 0..7), then on held-out seeds (``planner.evaluate.verify_plan``,
seeds from 1,000,000) realized speedup, PSNR and SSIM against full compute; plus the digit
classifier's accuracy of full compute vs each plan at 2x. The acceptance targets: greedy meets
every predicted budget, beats uniform by >= 3 dB and smoothcache by >= 1 dB PSNR, and the 2x
greedy search takes < 60 s on 2 cores.

    python benchmarks/search_bench.py [--budgets 1.5x,2x,3x] [--strategies greedy,uniform,smoothcache]
                                      [--calib-samples 8] [--verify-samples 8] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROFILE = ROOT / "profiles" / "digits-dit_ddim50_g3_cpu"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default=str(PROFILE))
    ap.add_argument("--budgets", default="1.5x,2x,3x")
    ap.add_argument("--strategies", default="greedy,uniform,smoothcache")
    ap.add_argument("--level", default="block", help="level param of uniform/smoothcache (block, sublayer, auto)")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--verify-samples", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side in verify_plan")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from planner.errors import PlannerError
    from planner.evaluate import EVAL_SEED_BASE, evaluation_seeds, verify_plan
    from planner.executor import apply_plan
    from planner.metrics import digit_accuracy
    from planner.profile import load_profile
    from planner.runner import Sampler, load_runner
    from search import get_strategy
    from search.budget import Budget
    from search.context import SearchContext

    torch.set_num_threads(args.threads)
    profile = load_profile(args.profile)
    runner = load_runner(profile.meta.model_spec)
    sampler = Sampler("ddim", profile.meta.steps, profile.meta.sampler.guidance)
    context = SearchContext.build(runner, sampler, profile, samples=args.calib_samples)

    rows = []
    plans_2x = {}
    for label in args.budgets.split(","):
        budget = Budget.parse(label)
        for name in args.strategies.split(","):
            params = {} if name == "greedy" else {"level": args.level}
            row = {"budget": budget.label(), "strategy": name}
            start = time.perf_counter()
            try:
                plan = get_strategy(name)(**params).search(context, budget)
            except PlannerError as e:
                row.update(search_s=round(time.perf_counter() - start, 2), error=str(e))
                rows.append(row)
                print(f"{label} {name}: {e}", file=sys.stderr)
                continue
            row["search_s"] = round(time.perf_counter() - start, 2)
            pred = plan.prediction
            row.update(predicted_speedup=pred.speedup, meets_budget=budget.met(pred.speedup, pred.calib_error),
                       calib_error=pred.calib_error, params=plan.provenance.params)
            v = verify_plan(runner, sampler, plan, samples=args.verify_samples, repeats=args.repeats)
            row.update(realized_speedup=v["speedup"], psnr=v["psnr"], ssim=v["ssim"])
            rows.append(row)
            if budget.speedup == 2.0:
                plans_2x[name] = plan
            print(f"{label} {name}: {row['search_s']:.1f} s, {pred.speedup:.2f}x predicted, "
                  f"err {pred.calib_error:.4f}, {v['speedup']:.2f}x realized, {v['psnr']:.2f} dB", file=sys.stderr)

    accuracy = {}
    if plans_2x:
        n = args.verify_samples
        conditions = runner.conditions(n, seed=EVAL_SEED_BASE)
        seeds = evaluation_seeds(n)
        accuracy["full"] = digit_accuracy(runner.run(conditions, seeds, sampler), conditions)
        for name, plan in plans_2x.items():
            with apply_plan(runner, plan):
                accuracy[name] = digit_accuracy(runner.run(conditions, seeds, sampler), conditions)

    if args.json:
        print(json.dumps({"rows": rows, "digit_accuracy_2x": accuracy}, indent=2))
        return 0
    print("| budget | strategy | search s | pred. speedup | calib err | realized speedup | PSNR dB | SSIM |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['budget']} | {r['strategy']} | {r['search_s']:.1f} | {r['error']} | | | | |")
            continue
        print(f"| {r['budget']} | {r['strategy']} | {r['search_s']:.1f} | {r['predicted_speedup']:.2f}x"
              f"{'' if r['meets_budget'] else ' (missed)'} | {r['calib_error']:.4f} | {r['realized_speedup']:.2f}x"
              f" | {r['psnr']:.2f} | {r['ssim']:.4f} |")
    if accuracy:
        print()
        print("digit classifier accuracy at 2x (held-out seeds): " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
