"""What the schedule benchmarks share: their command line, and each model with its full run on held-out seeds."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Iterator

MODELS = "digits-dit,digits-mmdit,digits-dit-wide,digits-dit-deep"


def parser(doc: str) -> argparse.ArgumentParser:
    """The options every schedule benchmark takes: ``--models``, ``--seeds`` (held out), ``--json``, ``--out``."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--seeds", type=int, default=128, help="held-out seeds")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=None)
    return ap


@dataclass
class HeldOut:
    """One model at its default sampler, with the held-out inputs and their full-compute output."""

    name: str
    runner: Any
    sampler: Any
    blocks: list[str]
    conditions: Any
    seeds: list[int]
    reference: Any

    def run(self, plan=None):
        """The held-out inputs' output under ``plan`` (applied through the executor), or full compute."""
        from planner.executor import apply_plan

        if plan is None:
            return self.runner.run(self.conditions, self.seeds, self.sampler)
        with apply_plan(self.runner.pipe, plan):
            return self.runner.run(self.conditions, self.seeds, self.sampler)

    @property
    def label(self) -> str:
        s = self.sampler
        return f"{s.scheduler} {s.steps} steps, guidance {s.guidance:g}"


def held_out_models(models: str, n_seeds: int) -> Iterator[HeldOut]:
    """Each of the comma-separated ``models`` on one thread, with its full run on ``n_seeds`` held-out seeds."""
    import torch

    from planner.runner import load_runner
    from planner.seeds import evaluation_seeds

    torch.set_num_threads(1)
    seeds = evaluation_seeds(n_seeds)
    for name in models.split(","):
        runner = load_runner(name)
        sampler = runner.resolve(None)
        model = HeldOut(name, runner, sampler, [m.name for m in runner.modules() if m.kind == "block"],
                        runner.conditions(len(seeds), seed=seeds[0]), seeds, None)
        model.reference = model.run()
        yield model


def search_parser(doc: str) -> argparse.ArgumentParser:
    """:func:`parser` with the options of the benchmarks that search: ``--budgets``, ``--costs``, ``--jobs``."""
    ap = parser(doc)
    ap.add_argument("--budgets", default="1.5x,2x,3x")
    ap.add_argument("--costs", default="flops,measured")
    ap.add_argument("--jobs", type=int, default=1, help="models searched at once (one thread each)")
    return ap


def rows_per_model(model_rows, args: argparse.Namespace) -> list[dict]:
    """``model_rows(name, budgets, costs, seeds)`` for each of ``args.models``, one model per worker process
    (``args.jobs`` at once), its rows in model order."""
    from concurrent.futures import ProcessPoolExecutor

    models, budgets, costs = args.models.split(","), args.budgets.split(","), args.costs.split(",")
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        return [r for rs in pool.map(model_rows, models, *zip(*[(budgets, costs, args.seeds)] * len(models)))
                for r in rs]


def search_context(model: HeldOut):
    """A greedy search context for ``model`` (8 calibration inputs, its default profile) with the reference run
    of greedy's judge already made, so that it is shared by every search on it."""
    from planner.profile.store import profile_for
    from planner.search.context import SearchContext
    from planner.search.greedy import JUDGE_FACTOR

    context = SearchContext.build(model.runner, model.sampler, profile_for(model.runner, model.sampler, None, samples=8))
    context.widened(JUDGE_FACTOR * len(context.seeds))
    return context


def searched_rows(name: str, budgets: list[str], costs: list[str], n_seeds: int, row_for) -> list[dict]:
    """One row per cost source and budget on model ``name`` (``n_seeds`` held-out seeds): ``model``, ``costs``,
    ``budget`` and what ``row_for(model, context, cost, budget)`` gives, every search on one shared context."""
    model = next(held_out_models(name, n_seeds))
    context = search_context(model)
    return [{"model": name, "costs": cost, "budget": budget, **row_for(model, context, cost, budget)}
            for cost in costs for budget in budgets]
