"""How far greedy's plan is from the best schedule its periodic sweep can build, on held-out seeds.

On each model, cost source and speed budget, greedy searches as it does by default (sweep, limited
twins, judge, refinement), and every schedule of its sweep is built too: each shape fitted to the
budget (:func:`planner.search._periodic.periodic_candidates`, the levels greedy sweeps) and the limited
twin (``L``) of each second-order one that still meets the budget. Every distinct schedule and
greedy's plan are run on held-out seeds and scored against full compute: pooled PSNR (the headline),
mean and worst per-image PSNR. The headroom is the best schedule's pooled PSNR less greedy's plan's:
what a perfect ranking of the same plans could add. It is an upper bound (the best is picked on the
very seeds it is scored on); near zero it says that the plans the search can build, not the way it
ranks them, limit its quality at that budget.

The split estimate does without that bias: the schedule with the best pooled PSNR on the first half
of the seeds is scored against greedy's plan on the second half, with the paired bootstrap interval of
the difference (:func:`planner.metrics.paired_psnr_difference`). It is what picking by a perfect
judge of as many inputs as half the seeds would add, and whether those seeds can tell.

Results go to ``benchmarks/results/search_headroom.{json,md}``.

    OMP_NUM_THREADS=1 python benchmarks/search_headroom.py --jobs 2
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._held_out import rows_per_model, search_parser, searched_rows  # noqa: E402
from benchmarks._results import finish, psnr_text  # noqa: E402


def model_rows(name: str, budgets: list[str], costs: list[str], n_seeds: int) -> list[dict]:
    """Greedy's plan and every schedule of its sweep, at each cost source and budget, on model ``name``."""
    return searched_rows(name, budgets, costs, n_seeds, headroom)


def sweep_schedules(context, budget):
    """Every schedule greedy's sweep builds for ``budget``: the fitted shapes and their limited twins."""
    from planner.search._periodic import LIMITED, _meets, periodic_candidates

    shapes = [c.shape for c in periodic_candidates(context, budget)]
    twins = [replace(s, code=LIMITED[s.code]) for s in shapes if s.code in LIMITED]
    return shapes + [t for t in twins if _meets(context, budget, t)]


def headroom(model, context, cost: str, budget: str) -> dict:
    """Greedy's plan and the best of its sweep's schedules on the held-out seeds."""
    from planner.metrics import per_image_mse, psnr_summary_of
    from planner.search.api import run_search
    from planner.search.budget import Budget

    plan = run_search(None, budget, strategy="greedy", context=context, costs=cost).plan
    priced = context.with_costs(cost)
    errors = {"greedy": per_image_mse(model.run(plan), model.reference)}
    params = {"greedy": plan.provenance.params.get("periodic")}
    for shape in sweep_schedules(priced, Budget.parse(budget)):
        key = shape.key(priced.steps)
        if key not in errors:
            errors[key] = per_image_mse(model.run(shape.plan(priced)), model.reference)
            params[key] = shape.params()
    scores = {key: {**psnr_summary_of(e), "periodic": params[key]} for key, e in errors.items()}
    picked, scored = scores.pop("greedy"), scores
    best = max([picked, *scored.values()], key=lambda s: s["psnr"])
    better = sum(s["psnr"] > picked["psnr"] for s in scored.values())
    return {"greedy": picked, "best": best, "schedules": len(scored), "better_than_greedy": better,
            "headroom": best["psnr"] - picked["psnr"], "split": split_headroom(errors)}


def split_headroom(errors: dict) -> dict:
    """The plan best on the first half of the seeds (by pooled PSNR; ``errors``: per-image MSEs, greedy's plan
    under ``"greedy"``) against greedy's plan on the second half: whether greedy's plan or a schedule was
    picked, the pooled PSNR difference there and its paired bootstrap interval."""
    from planner.metrics import paired_psnr_difference

    half = len(errors["greedy"]) // 2
    pick = min(errors, key=lambda key: errors[key][:half].mean().item())
    return {"picked": "greedy" if pick == "greedy" else "schedule",
            **paired_psnr_difference(errors[pick][half:], errors["greedy"][half:])}


def _shape(s: dict) -> str:
    p = s["periodic"] or {}
    spacing = f"strides {p['stride'][0]}/{p['stride'][1]} switch {p['switch']}" if p.get("stride") else \
        f"{p.get('computes')} spread {p.get('lean')}"
    moved = f", {len(p['moves'])} moved" if p.get("moves") else ""
    return f"{p.get('level')} {p.get('code')} warm-up {p.get('warmup')} cool-down {p.get('cooldown')}, {spacing}{moved}"


def render(rows: list[dict], seeds: int) -> None:
    """Print greedy's plan beside the best schedule of its sweep per search, and the summary."""
    print(f"Greedy's plan and the best of the schedules its sweep builds, PSNR in dB against full compute on {seeds} "
          f"held-out seeds (pooled / mean per image / worst image). Headroom: best pooled less greedy's.\n")
    print("| model | costs | budget | schedules | greedy's plan | best schedule | headroom | schedules better than greedy's |")
    print("|---|---|---|---:|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['costs']} | {r['budget']} | {r['schedules']} | {psnr_text(r['greedy'])} "
              f"| {psnr_text(r['best'])} | {r['headroom']:+.2f} | {r['better_than_greedy']} |")
    print("\nGreedy's plan and the best schedule where they differ:\n")
    for r in rows:
        if r["headroom"] > 0:
            print(f"- {r['model']}, {r['costs']} {r['budget']}: greedy {_shape(r['greedy'])}; best {_shape(r['best'])}")
    worst = max(rows, key=lambda r: r["headroom"])
    print(f"\nLargest headroom {worst['headroom']:+.2f} dB ({worst['model']}, {worst['costs']} {worst['budget']}); "
          f"mean {sum(r['headroom'] for r in rows) / len(rows):+.2f} dB over {len(rows)} searches; greedy's plan "
          f"is the best of its sweep in {sum(r['headroom'] == 0 for r in rows)}.")
    half = seeds // 2
    print(f"\nSplit estimate: the plan with the best pooled PSNR on the first {half} seeds (greedy's or a schedule), "
          f"less greedy's plan on the other {seeds - half}, with the paired 90% bootstrap interval over those seeds.\n")
    print("| model | costs | budget | picked on the first half | difference on the second half | interval |")
    print("|---|---|---|---|---:|---|")
    for r in rows:
        lo, hi = r["split"]["interval"]
        print(f"| {r['model']} | {r['costs']} | {r['budget']} | {r['split']['picked']} | "
              f"{r['split']['difference']:+.2f} | {lo:+.2f} to {hi:+.2f} |")
    split = [r["split"] for r in rows]
    print(f"\nMean split estimate {sum(s['difference'] for s in split) / len(split):+.2f} dB; its interval lies above "
          f"zero in {sum(s['interval'][0] > 0 for s in split)} of {len(split)} searches, below in "
          f"{sum(s['interval'][1] < 0 for s in split)}.")


def main(argv=None) -> int:
    ap = search_parser(__doc__)
    ap.set_defaults(costs="flops")
    args = ap.parse_args(argv)
    rows = rows_per_model(model_rows, args)
    return finish("search_headroom", {"seeds": args.seeds, "rows": rows}, lambda: render(rows, args.seeds), args.json,
                  args.out)


if __name__ == "__main__":
    raise SystemExit(main())
