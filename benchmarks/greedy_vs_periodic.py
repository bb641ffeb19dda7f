"""Greedy's default (the periodic schedule wherever one meets the budget) against comparing it with greedy's own plan.

On each model, cost source and speed budget, greedy searches twice on one shared context (one
calibration run, one judge): with ``seeds="compare"`` (greedy's own passes run too and the plan with
the lower calibration error on the judge's inputs is kept, the default before) and with the default
``seeds="periodic"``. Both plans run on held-out seeds and are scored against full compute: pooled PSNR
(the headline), mean and worst per-image PSNR. Where ``compare`` kept the schedule, the two plans are
the same.

Results go to ``benchmarks/results/greedy_vs_periodic.{json,md}``.

    OMP_NUM_THREADS=1 python benchmarks/greedy_vs_periodic.py --jobs 2 --seeds 256
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._held_out import rows_per_model, search_parser, searched_rows  # noqa: E402
from benchmarks._results import finish, psnr_text  # noqa: E402

SEEDS = ("compare", "periodic")


def model_rows(name: str, budgets: list[str], costs: list[str], n_seeds: int) -> list[dict]:
    """Both searches at each cost source and budget on model ``name``, and their plans on held-out seeds."""
    return searched_rows(name, budgets, costs, n_seeds, both_searches)


def both_searches(model, context, cost: str, budget: str) -> dict:
    """Greedy with each ``seeds`` setting: its plan on the held-out seeds, what it chose and its calibration runs."""
    from planner.metrics import psnr_summary
    from planner.search.api import run_search

    row = {}
    for seeds in SEEDS:
        outcome = run_search(None, budget, strategy="greedy", context=context, costs=cost, seeds=seeds)
        plan, params = outcome.plan, outcome.plan.provenance.params
        row[seeds] = {**psnr_summary(model.run(plan), model.reference), "chosen": params.get("chosen"),
                      "judged": params.get("judged"), "speedup": plan.prediction.speedup,
                      "runs": params["search_cost"]["runs"]}
    return row


def render(rows: list[dict], seeds: int) -> None:
    """Print both plans per search and the summary."""
    print(f"Greedy comparing the periodic schedule with its own plan (`seeds=compare`, the default before) and "
          f"keeping the schedule (`seeds=periodic`, the default); PSNR in dB against full compute on {seeds} "
          f"held-out seeds (pooled / mean per image / worst image), predicted speedup, calibration runs.\n")
    print("| model | costs | budget | compare chose | compare | periodic | difference, pooled | runs: compare / periodic |")
    print("|---|---|---|---|---|---|---:|---|")
    for r in rows:
        cells = [f"{psnr_text(r[k])} at {r[k]['speedup']:.2f}x" for k in SEEDS]
        print(f"| {r['model']} | {r['costs']} | {r['budget']} | {r['compare']['chosen']} | {cells[0]} | {cells[1]} "
              f"| {r['periodic']['psnr'] - r['compare']['psnr']:+.2f} "
              f"| {r['compare']['runs']:.0f} / {r['periodic']['runs']:.0f} |")
    changed = [r for r in rows if r["compare"]["chosen"] != "periodic"]
    diffs = [r["periodic"]["psnr"] - r["compare"]["psnr"] for r in changed]
    runs = [sum(r[k]["runs"] for r in rows) for k in SEEDS]
    print(f"\n`compare` kept greedy's own plan in {len(changed)} of {len(rows)} searches"
          + (f"; there the schedule is better by {min(diffs):+.2f} to {max(diffs):+.2f} dB pooled" if diffs else "")
          + f". Calibration runs in all: {runs[0]:.0f} comparing, {runs[1]:.0f} keeping the schedule.")


def main(argv=None) -> int:
    args = search_parser(__doc__).parse_args(argv)
    rows = rows_per_model(model_rows, args)
    return finish("greedy_vs_periodic", {"seeds": args.seeds, "rows": rows}, lambda: render(rows, args.seeds),
                  args.json, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
