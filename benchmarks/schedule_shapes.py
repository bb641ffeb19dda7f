"""Where the computed steps of a periodic forecast schedule go, at equal compute: held-out quality.

On one model (DDIM 50, guidance 3) every block follows one code string. Each row is one schedule run
through the executor on 8 held-out seeds and scored against full compute (pooled PSNR), with its
calibration error (relative L1 of the final latents on the 8 calibration inputs) and its FLOP speedup
on the profile's FLOP counts. Rows: diffusers' TaylorSeer at interval 2 (blocks, three warm-up steps)
and the same schedule as our plan of ``F`` codes; then, at 33 computed steps, the even spread greedy's
seeds used before two-stride schedules and two stride placements.

Results go to ``benchmarks/results/schedule_shapes.{json,md}``.

    OMP_NUM_THREADS=1 python benchmarks/schedule_shapes.py --model digits-dit-deep
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._results import finish  # noqa: E402


def schedules(steps: int) -> dict[str, str]:
    """Name -> code string of every schedule the script measures."""
    from planner.search._periodic import PeriodicShape

    return {
        "TaylorSeer interval 2 as F codes": PeriodicShape("block", "F", 3, 0, 0, stride=(2, 2)).codes(steps),
        "33 computed, spread evenly (warm-up 4)": PeriodicShape("block", "F", 4, 0, 29).codes(steps),
        "33 computed, one in two from step 3, then every step": PeriodicShape(
            "block", "F", 3, 0, 0, stride=(2, 1), switch=35).codes(steps),
        "33 computed, every step, then one in two to the end": PeriodicShape(
            "block", "F", 17, 0, 0, stride=(2, 2)).codes(steps),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="digits-dit-deep")
    ap.add_argument("--profile", default=None, help="profile folder (default: profiles/<name>, made if missing)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    from planner.bench.peers import peer_runs
    from planner.executor import apply_plan
    from planner.metrics import psnr
    from planner.profile.store import profile_for
    from planner.runner import Sampler, load_runner
    from planner.search.context import SearchContext
    from planner.seeds import evaluation_seeds

    torch.set_num_threads(1)
    runner = load_runner(args.model)
    sampler = runner.resolve(Sampler("ddim", 50, 3.0))
    context = SearchContext.build(runner, sampler, profile_for(runner, sampler, args.profile), samples=8, costs="flops")
    seeds = evaluation_seeds(8)
    conditions = runner.conditions(len(seeds), seed=seeds[0])
    reference = runner.run(conditions, seeds, sampler)

    rows = []
    for peer in peer_runs(runner, sampler, ["diffusers-taylorseer"], {"diffusers-taylorseer": [2]})[0]:
        rows.append({"schedule": f"diffusers TaylorSeer {peer.setting}", "codes": None, "computed": None,
                     "flop_speedup": None, "calib_error": None,
                     "psnr": psnr(peer.run(conditions, seeds, sampler), reference)})
    for name, codes in schedules(sampler.steps).items():
        plan = context.plan({b: codes for b in (m.name for m in context.modules if m.kind == "block")})
        evaluation = context.evaluate(plan)
        with apply_plan(runner.pipe, plan):
            out = runner.run(conditions, seeds, sampler)
        rows.append({"schedule": name, "codes": codes, "computed": codes.count("C"),
                     "flop_speedup": evaluation.predicted_speedup, "calib_error": evaluation.error,
                     "psnr": psnr(out, reference)})

    def render():
        print(f"{args.model}, DDIM 50, guidance 3; 8 held-out seeds, pooled PSNR against full compute.\n")
        print("| schedule | codes | computed | FLOP speedup | calibration error | PSNR pooled |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            num = (lambda v, f: "" if v is None else format(v, f))
            print(f"| {r['schedule']} | {'`' + r['codes'] + '`' if r['codes'] else ''} | {num(r['computed'], 'd')} | "
                  f"{num(r['flop_speedup'], '.2f')} | {num(r['calib_error'], '.4f')} | {r['psnr']:.2f} |")

    return finish("schedule_shapes", {"model": args.model, "rows": rows}, render, args.json, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
