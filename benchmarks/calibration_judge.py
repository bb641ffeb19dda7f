"""How many calibration inputs it takes to pick between close periodic schedules: 8 or 32.

On one model, at each FLOP budget, greedy's periodic sweep (:func:`planner.search._periodic.periodic_candidates`)
ranks its schedules by the calibration error on the search's 8 calibration inputs. The sweep's
``--finalists`` best are then scored three ways: the calibration error (relative L1 of the final
latents) on those 8 inputs and on 32 (seeds 0..31, the judge greedy builds with ``judge_samples=32``),
and pooled PSNR on 32 held-out seeds, with the spread of that pooled PSNR over the four disjoint sets
of 8 held-out seeds (how far an 8-seed measurement can land from the 32-seed one). The summary says
which schedule each ranking picks and the held-out PSNR of its pick.

Results go to ``benchmarks/results/calibration_judge.<model>.{json,md}``.

    OMP_NUM_THREADS=1 python benchmarks/calibration_judge.py --model digits-dit \\
        --profile profiles/digits-dit_ddim50_g3_cpu
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._results import finish  # noqa: E402

HELD_OUT = 32
RANKINGS = {"calibration error, 8 inputs": "calib_8", "calibration error, 32 inputs": "calib_32"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="digits-dit")
    ap.add_argument("--profile", default=None, help="profile folder (default: profiles/<name>, made if missing)")
    ap.add_argument("--budgets", default="1.5x,2x,3x", help="FLOP budgets")
    ap.add_argument("--finalists", type=int, default=6)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    from planner.executor import apply_plan
    from planner.metrics import psnr
    from planner.profile.store import profile_for
    from planner.runner import load_runner
    from planner.search._periodic import judge_error, periodic_candidates
    from planner.search.budget import Budget
    from planner.search.context import SearchContext
    from planner.seeds import evaluation_seeds

    torch.set_num_threads(1)
    runner = load_runner(args.model)
    sampler = runner.resolve(None)
    context = SearchContext.build(runner, sampler, profile_for(runner, sampler, args.profile), samples=8, costs="flops")
    judge = context.widened(32)
    seeds = evaluation_seeds(HELD_OUT)
    conditions = runner.conditions(len(seeds), seed=seeds[0])
    reference = runner.run(conditions, seeds, sampler)

    budgets = []
    for text in args.budgets.split(","):
        rows = []
        for candidate in periodic_candidates(context, Budget.parse(text))[:args.finalists]:
            with apply_plan(runner.pipe, candidate.shape.plan(context)):
                out = runner.run(conditions, seeds, sampler)
            by_8 = [psnr(out[i:i + 8], reference[i:i + 8]) for i in range(0, HELD_OUT, 8)]
            rows.append({"codes": candidate.shape.codes(context.steps), "flop_speedup": candidate.evaluation.predicted_speedup,
                         "calib_8": candidate.error, "calib_32": judge_error(judge, candidate),
                         "psnr_32": psnr(out, reference), "psnr_8_min": min(by_8), "psnr_8_max": max(by_8)})
        picks = {name: min(rows, key=lambda r: r[key])["psnr_32"] for name, key in RANKINGS.items()}
        budgets.append({"budget": text, "rows": rows, "picks": picks, "best": max(r["psnr_32"] for r in rows)})

    def render():
        print(f"{args.model}, {sampler.scheduler} {sampler.steps} steps, guidance {sampler.guidance:g}; the periodic "
              f"sweep's {args.finalists} best at each FLOP budget; pooled PSNR on {HELD_OUT} held-out seeds, and its "
              f"range over the four disjoint sets of 8.\n")
        print("| budget | pick by 8 inputs | pick by 32 inputs | best of the finalists |")
        print("|---|---|---|---|")
        for b in budgets:
            p = list(b["picks"].values())
            print(f"| {b['budget']} | {p[0]:.2f} | {p[1]:.2f} | {b['best']:.2f} |")
        for b in budgets:
            print(f"\n**{b['budget']}**\n")
            print("| codes | FLOP speedup | calib. error, 8 | calib. error, 32 | PSNR pooled, 32 seeds | over 8 seeds |")
            print("|---|---|---|---|---|---|")
            for r in b["rows"]:
                print(f"| `{r['codes']}` | {r['flop_speedup']:.2f} | {r['calib_8']:.5f} | {r['calib_32']:.5f} | "
                      f"{r['psnr_32']:.2f} | {r['psnr_8_min']:.2f} - {r['psnr_8_max']:.2f} |")

    return finish(f"calibration_judge.{args.model}", {"model": args.model, "budgets": budgets}, render, args.json,
                  args.out)


if __name__ == "__main__":
    raise SystemExit(main())
