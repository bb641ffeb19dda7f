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
    from planner.metrics import psnr_summary
    from planner.search.api import run_search
    from planner.search.budget import Budget

    plan = run_search(None, budget, strategy="greedy", context=context, costs=cost).plan
    picked = {**psnr_summary(model.run(plan), model.reference), "periodic": plan.provenance.params.get("periodic")}
    priced = context.with_costs(cost)
    scored: dict = {}
    for shape in sweep_schedules(priced, Budget.parse(budget)):
        key = shape.key(priced.steps)
        if key not in scored:
            scored[key] = {**psnr_summary(model.run(shape.plan(priced)), model.reference), "periodic": shape.params()}
    best = max([picked, *scored.values()], key=lambda s: s["psnr"])
    better = sum(s["psnr"] > picked["psnr"] for s in scored.values())
    return {"greedy": picked, "best": best, "schedules": len(scored), "better_than_greedy": better,
            "headroom": best["psnr"] - picked["psnr"]}


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


def main(argv=None) -> int:
    ap = search_parser(__doc__)
    ap.set_defaults(costs="flops")
    args = ap.parse_args(argv)
    rows = rows_per_model(model_rows, args)
    return finish("search_headroom", {"seeds": args.seeds, "rows": rows}, lambda: render(rows, args.seeds), args.json,
                  args.out)


if __name__ == "__main__":
    raise SystemExit(main())
