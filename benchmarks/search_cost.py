"""What a 2x greedy search costs against depth and steps (issue 19, part 3).

DiT-XL/2's transformer (benchmarks/scale.py's config and builder) with random weights at reduced width
(2 heads x 32: width 64) and ``--sample-size`` latents, at depths 8, 16, 28 and 57 blocks and 20 and 50
DDIM steps. Per (depth, steps): a FLOP-costed profile (so that the search does not depend on timings
measured on a loaded machine), then ``run_search(..., "2x", strategy="greedy")`` on ``--calib-samples``
calibration inputs, whose plan records the search cost (``params.search_cost``, see
planner/search/_cost.py):

* ``runs``: block forwards that ran, in full sampling runs of the calibration batch (the cost with
  incremental trials, the default);
* ``runs_full``: what the same search costs when every trial re-runs the whole transformer and each
  step's final forward runs again (``incremental=false``): the same trials, so its transformer calls are
  the incremental search's plus one per step and pass (the steps after the first), each a whole forward;
  ``--full`` measures it at some depths to check the count;
* ``wall_s``: the search's wall time (the calibration reference run and the profile excluded).

With ``--full DEPTHS`` the search also runs with ``incremental=false`` at those depths (20 steps), to
time it and to check that both give the same plan and calibration error.

    OMP_NUM_THREADS=1 python benchmarks/search_cost.py                 # writes results/search_cost.{json,md}
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks._results import finish  # noqa: E402
from benchmarks.scale import CONFIGS, SMALL, build_runner  # noqa: E402
from planner.profile import profile_model  # noqa: E402
from planner.runner import Sampler  # noqa: E402
from planner.search.api import run_search  # noqa: E402

TARGET_RUNS = 30  # issue 19: a 2x greedy search costs at most 30 full sampling runs of the calibration batch


def dit_runner(depth: int, sample_size: int):
    """DiT-XL/2's pipeline with ``depth`` blocks, width 64 and ``sample_size`` latents, random weights, CPU."""
    base = CONFIGS["dit-xl-2-256"]
    cfg = replace(base, name=f"dit-xl-2-depth{depth}",
                  reduced={**SMALL, "num_layers": depth, "sample_size": sample_size})
    return build_runner(cfg, "cpu", torch.float32, reduced=True)


def greedy_cost(runner, steps: int, samples: int, incremental: bool = True) -> dict:
    """One 2x greedy search on ``runner`` at ``steps`` DDIM steps: its recorded cost and plan figures."""
    sampler = runner.resolve(Sampler("ddim", steps, 4.0))
    t0 = time.perf_counter()
    profile = profile_model(runner, sampler, samples=samples, lags=2, costs="flops", flops=False)
    profile_s = time.perf_counter() - t0
    outcome = run_search(runner, "2x", strategy="greedy", sampler=sampler, profile=profile, calib_samples=samples,
                         incremental=incremental)
    plan, cost = outcome.plan, outcome.cost
    params = plan.provenance.params
    calls_per_step = cost["calls_per_run"] // steps
    finals = 0 if not incremental else params["passes"] * (steps - 1) * calls_per_step
    return {
        "steps": steps, "incremental": incremental, "passes": params.get("passes"),
        "transformer_calls": cost["transformer_calls"],
        "block_calls": cost["block_calls"], "runs": cost["runs"],
        "runs_full": round((cost["transformer_calls"] + finals) / cost["calls_per_run"], 3),
        "wall_s": cost["wall_s"], "profile_s": round(profile_s, 2), "predicted_speedup": plan.prediction.speedup,
        "calib_error": plan.prediction.calib_error, "decisions": plan.decisions,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", default="8,16,28,57")
    ap.add_argument("--steps", default="20,50")
    ap.add_argument("--sample-size", type=int, default=8, help="latent side (8: 16 tokens at patch 2)")
    ap.add_argument("--calib-samples", type=int, default=2)
    ap.add_argument("--full", default="8,16,28", help="depths also searched with incremental=false at the first --steps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    depths = [int(d) for d in args.depths.split(",") if d]
    steps = [int(s) for s in args.steps.split(",") if s]
    full = {int(d) for d in args.full.split(",") if d}

    rows, checks = [], []
    for depth in depths:
        runner = dit_runner(depth, args.sample_size)
        for n in steps:
            row = greedy_cost(runner, n, args.calib_samples)
            decisions = row.pop("decisions")
            rows.append({"depth": depth, **row})
            print(f"depth {depth} steps {n}: {row['runs']:.1f} runs ({row['runs_full']:.1f} without incremental), "
                  f"{row['wall_s']:.1f} s, {row['passes']} passes", file=sys.stderr, flush=True)
            if depth in full and n == steps[0]:
                ref = greedy_cost(runner, n, args.calib_samples, incremental=False)
                checks.append({"depth": depth, "steps": n, "wall_s_full": ref["wall_s"], "wall_s_incremental": row["wall_s"],
                               "same_plan": ref["decisions"] == decisions,
                               "calib_error_full": ref["calib_error"], "calib_error_incremental": row["calib_error"],
                               "runs_full_measured": ref["runs"], "runs_full_counted": row["runs_full"],
                               "transformer_calls_full": ref["transformer_calls"]})
        del runner

    growth = _growth(rows, steps)
    payload = {"model": "DiTTransformer2DModel (DiT-XL/2 config), random weights, width 64, "
                        f"sample size {args.sample_size} ({(args.sample_size // 2) ** 2} tokens), CPU float32",
               "sampler": "DDIM, guidance 4 (batched CFG)", "calib_samples": args.calib_samples,
               "budget": "2x", "target_runs": TARGET_RUNS, "rows": rows, "full_checks": checks, "growth": growth}

    def render() -> None:
        print(f"2x greedy search cost, {payload['model']}, {payload['sampler']}, {args.calib_samples} calibration "
              f"samples; runs = full sampling runs of the calibration batch (reference run and profile excluded).\n")
        print("| blocks | steps | passes | transformer calls | runs (incremental) | runs (full trials) | search s |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['depth']} | {r['steps']} | {r['passes']} | {r['transformer_calls']} | {r['runs']:.1f} | "
                  f"{r['runs_full']:.1f} | {r['wall_s']:.1f} |")
        if checks:
            print("\nIncremental vs full trials (same search, `incremental=false`):\n")
            print("| blocks | steps | same plan | calib error full | calib error incremental | runs full (measured) | "
                  "runs full (counted) | s full | s incremental |")
            print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
            for c in checks:
                print(f"| {c['depth']} | {c['steps']} | {c['same_plan']} | {c['calib_error_full']:.6g} | "
                      f"{c['calib_error_incremental']:.6g} | {c['runs_full_measured']:.1f} | {c['runs_full_counted']:.1f} | "
                      f"{c['wall_s_full']:.1f} | "
                      f"{c['wall_s_incremental']:.1f} |")
        print("\nGrowth (least-squares slope of log runs against log blocks, per steps):")
        for n, g in growth.items():
            print(f"- {n} steps: runs ~ blocks^{g['runs_exponent']:.2f} incremental, blocks^{g['runs_full_exponent']:.2f} "
                  f"with full trials; runs per block {g['runs_per_block']:.2f}")

    return finish("search_cost", payload, render, args.json, args.out)


def _growth(rows: list[dict], steps: list[int]) -> dict:
    """Per step count: the exponent of runs against depth (log-log slope) and runs per block at the deepest."""
    import numpy as np

    out = {}
    for n in steps:
        rs = [r for r in rows if r["steps"] == n]
        if len(rs) < 2:
            continue
        x = np.log([r["depth"] for r in rs])
        fit = lambda key: float(np.polyfit(x, np.log([r[key] for r in rs]), 1)[0])  # noqa: E731
        deepest = max(rs, key=lambda r: r["depth"])
        out[str(n)] = {"runs_exponent": fit("runs"), "runs_full_exponent": fit("runs_full"),
                       "runs_per_block": deepest["runs"] / deepest["depth"]}
    return out


if __name__ == "__main__":
    sys.exit(main())
