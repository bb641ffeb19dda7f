"""Greedy's periodic schedules ranked by the pooled or by the typical calibration error, judged on held-out seeds.

On each model, cost source and speed budget, greedy searches twice on one shared context (one
calibration run, one judge), one search after the other: with the sweep, the limited twins, the
refinement, the judge and the choice between the greedy plan and the schedule ranking plans by the
relative L1 error pooled over the calibration inputs (the default,
:func:`planner.search._periodic.ranking_error`), and by the typical input's error (the geometric mean
of the per-input errors, ``Evaluation.typical``). Each plan is then run on held-out seeds and scored
against full compute: pooled PSNR (the headline), mean and worst per-image PSNR. The committed results
were made when greedy still compared its own plan with the schedule (``seeds="compare"``, the default then).

Results go to ``benchmarks/results/ranking_error.{json,md}``.

    OMP_NUM_THREADS=1 python benchmarks/ranking_error.py --jobs 2
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._held_out import rows_per_model, search_parser, searched_rows  # noqa: E402
from benchmarks._results import finish, psnr_text  # noqa: E402

RANKINGS = ("pooled", "typical")


def search(context, budget: str, costs: str, ranking: str):
    """One greedy search on the shared ``context`` with schedules ranked by ``ranking``: its plan."""
    from contextlib import nullcontext
    from unittest import mock

    from planner.search import _periodic
    from planner.search.api import run_search

    typical = mock.patch.object(_periodic, "ranking_error", lambda evaluation: evaluation.typical)
    with typical if ranking == "typical" else nullcontext():
        return run_search(None, budget, strategy="greedy", context=context, costs=costs).plan


def model_rows(name: str, budgets: list[str], costs: list[str], n_seeds: int) -> list[dict]:
    """Both searches at each cost source and budget on model ``name``, and their plans on held-out seeds."""
    return searched_rows(name, budgets, costs, n_seeds, both_rankings)


def both_rankings(model, context, cost: str, budget: str) -> dict:
    """Greedy ranking by each statistic: its plan on the held-out seeds (scored once where both agree)."""
    from planner.metrics import psnr_summary

    plans = {ranking: search(context, budget, cost, ranking) for ranking in RANKINGS}
    scores: dict = {}
    row = {}
    for ranking, plan in plans.items():
        key = (plan.output, str(plan.decisions))
        if key not in scores:
            scores[key] = psnr_summary(model.run(plan), model.reference)
        params = plan.provenance.params
        row[ranking] = {**scores[key], "chosen": params.get("chosen"), "periodic": params.get("periodic"),
                        "speedup": plan.prediction.speedup}
    row["same_plan"] = len(scores) == 1
    return row


def render(rows: list[dict], seeds: int) -> None:
    """Print the comparison of both rankings per search and its summary."""
    print(f"Greedy with plans ranked by the pooled calibration error (the default) and by the typical input's; "
          f"PSNR in dB against full compute on {seeds} held-out seeds (pooled / mean per image / worst image).\n")
    print("| model | costs | budget | same plan | ranked by pooled error | ranked by typical error | difference, pooled |")
    print("|---|---|---|---|---|---|---:|")
    for r in rows:
        cells = [psnr_text(r[k]) for k in RANKINGS]
        diff = r["typical"]["psnr"] - r["pooled"]["psnr"]
        print(f"| {r['model']} | {r['costs']} | {r['budget']} | {'yes' if r['same_plan'] else 'no'} "
              f"| {cells[0]} | {cells[1]} | {diff:+.2f} |")
    diffs = [r["typical"]["psnr"] - r["pooled"]["psnr"] for r in rows]
    print(f"\nSame plan in {sum(r['same_plan'] for r in rows)} of {len(rows)} searches; where they differ the "
          f"typical ranking is better in {sum(d > 0 for d in diffs)} and worse in {sum(d < 0 for d in diffs)}; "
          f"pooled PSNR difference summed {sum(diffs):+.2f} dB, mean {sum(diffs) / len(diffs):+.2f} dB, "
          f"smallest {min(diffs):+.2f} dB.")


def main(argv=None) -> int:
    args = search_parser(__doc__).parse_args(argv)
    rows = rows_per_model(model_rows, args)
    return finish("ranking_error", {"seeds": args.seeds, "rows": rows}, lambda: render(rows, args.seeds), args.json,
                  args.out)


if __name__ == "__main__":
    raise SystemExit(main())
