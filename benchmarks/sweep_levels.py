"""Greedy's periodic sweep with the block level swept whole, or repeating the output level's best shapes.

On each model, cost source and speed budget, greedy searches twice on one shared context (one
calibration run, one judge), one search after the other: with every periodic shape swept at both
levels (``seed_repeat=None``) and with the default (the output level's best four shapes swept again
with every block alike). Per pair: whether the two plans are the same (the codes of every module and
of the output), which schedule the default chose, the calibration runs each search made
(``params.search_cost.runs``, a count that does not depend on the machine's load) and its wall time.

Results go to ``benchmarks/results/sweep_levels.{json,md}``.

    OMP_NUM_THREADS=1 python benchmarks/sweep_levels.py --jobs 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._held_out import MODELS  # noqa: E402
from benchmarks._results import finish  # noqa: E402

SWEEPS = {"both whole": {"seed_repeat": None}, "default": {}}


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--budgets", default="1.5x,2x,3x")
    ap.add_argument("--costs", default="flops,measured")
    ap.add_argument("--jobs", type=int, default=1, help="models searched at once (one thread each)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def search(context, budget: str, costs: str, settings: dict) -> dict:
    """One greedy search on the shared ``context``: its plan's codes and what the search cost."""
    from planner.search.api import run_search

    outcome = run_search(None, budget, strategy="greedy", context=context, costs=costs, **settings)
    plan, params = outcome.plan, outcome.plan.provenance.params
    return {"codes": {"output": plan.output, "decisions": plan.decisions},
            "chosen": params.get("chosen"), "periodic": params.get("periodic"),
            "runs": params["search_cost"]["runs"], "search_s": outcome.search_s}


def model_rows(name: str, budgets: list[str], costs: list[str]) -> list[dict]:
    """Both searches at each cost source and budget on model ``name``, on one thread."""
    import torch

    from planner.profile.store import profile_for
    from planner.runner import load_runner
    from planner.search.context import SearchContext
    from planner.search.greedy import JUDGE_FACTOR

    torch.set_num_threads(1)
    runner = load_runner(name)
    sampler = runner.resolve(None)
    context = SearchContext.build(runner, sampler, profile_for(runner, sampler, None, samples=8))
    context.widened(JUDGE_FACTOR * len(context.seeds))  # the judge's reference run, before either search
    rows = []
    for cost in costs:
        for budget in budgets:
            found = {label: search(context, budget, cost, settings) for label, settings in SWEEPS.items()}
            codes = [f.pop("codes") for f in found.values()]
            rows.append({"model": name, "costs": cost, "budget": budget, "same_plan": codes[0] == codes[1], **found})
    return rows


def main(argv=None) -> int:
    args = parse(argv)
    from concurrent.futures import ProcessPoolExecutor

    models, budgets, costs = args.models.split(","), args.budgets.split(","), args.costs.split(",")
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:  # one model per worker
        rows = [r for rs in pool.map(model_rows, models, [budgets] * len(models), [costs] * len(models)) for r in rs]

    def render():
        print("Greedy with both levels of the periodic sweep swept whole, and with the default (the output "
              "level's best four shapes again at block level); calibration runs and wall seconds per search, "
              "one after the other in one process.\n")
        print("| model | costs | budget | same plan | chosen (default) | runs: both whole | runs: default "
              "| s: both whole | s: default |")
        print("|---|---|---|---|---|---:|---:|---:|---:|")
        for r in rows:
            whole, default = r["both whole"], r["default"]
            level = (default["periodic"] or {}).get("level", "")
            print(f"| {r['model']} | {r['costs']} | {r['budget']} | {'yes' if r['same_plan'] else 'no'} "
                  f"| {default['chosen']} {level} | {whole['runs']:.1f} | {default['runs']:.1f} "
                  f"| {whole['search_s']:.0f} | {default['search_s']:.0f} |")
        same = sum(r["same_plan"] for r in rows)
        runs = [sum(r[label]["runs"] for r in rows) for label in SWEEPS]
        print(f"\nSame plan in {same} of {len(rows)} searches; calibration runs in all: {runs[0]:.0f} with both levels "
              f"whole, {runs[1]:.0f} with the default ({runs[1] / runs[0]:.2f}x).")

    return finish("sweep_levels", {"rows": rows}, render, args.json, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
