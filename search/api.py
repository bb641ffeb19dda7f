"""The entry point: search a cache plan for a model in one call (``planner.search_plan``).

``search_plan(model, "2x", strategy="greedy", **settings)`` checks the settings (before loading
anything), loads the model when given a name, finds or makes its profile, builds the search
context on the calibration inputs, runs the strategy, checks the plan meets the budget and, with
``out``, writes it (by-products such as a router or a Pareto front go to the folder of the same
name beside it). ``planner search`` and the bench go through :func:`run_search`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.errors import PlannerError
from planner.plan import Plan, artifacts_dir, staged_plan
from planner.profile.flop_costs import check_cost_source
from planner.search import Strategy, make_strategy
from planner.search.budget import Budget
from planner.search.context import SearchContext


@dataclass
class SearchOutcome:
    """A finished search: the plan, the context it was searched on, and what it took."""

    plan: Plan
    context: SearchContext
    strategy: Strategy
    profile_s: float
    search_s: float
    out: Path | None = None
    cost: dict | None = None  # model calls and wall time of the strategy's search (planner.search._cost)


def as_budget(budget: str | float | Budget | None, max_error: float | None = None) -> Budget:
    """A :class:`Budget` from ``"2x"``, ``"60%"``, a number (a speedup) or an error target (default 2x)."""
    if isinstance(budget, Budget):
        return budget
    if budget is None:
        return Budget(max_error=max_error) if max_error is not None else Budget(speedup=2.0)
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        return Budget(speedup=float(budget), max_error=max_error)
    return Budget.parse(budget, max_error)


def run_search(model: Any, budget: str | float | Budget | None = None, *, strategy: str | Strategy = "greedy",
               max_error: float | None = None, sampler: Any = None, profile: Any = None, calib_samples: int = 8,
               out: str | Path | None = None, device: str = "auto", progress: bool = False,
               context: SearchContext | None = None, prompts: Any = None, negative_prompt: str | None = None,
               call_args: dict | None = None, steps: int | None = None, guidance: float | None = None,
               height: int | None = None, width: int | None = None, num_frames: int | None = None,
               costs: str | None = None, **settings: Any) -> SearchOutcome:
    """:func:`search_plan`, returning the context and timings with the plan."""
    from planner.profile import Profile
    from planner.profile.store import profile_for
    from planner.runner import as_runner, make_sampler

    budget = as_budget(budget, max_error)
    if costs is not None:
        check_cost_source(costs)
    if isinstance(strategy, Strategy):
        if settings:
            raise PlannerError("give settings to the strategy object or as keywords, not both")
        chosen = strategy
    else:
        chosen = make_strategy(strategy, settings)  # bad settings fail before any model loads
    if calib_samples < 1:
        raise PlannerError(f"calib_samples must be at least 1, got {calib_samples}")
    chosen.prepare()
    start = time.perf_counter()
    if context is None:
        runner = as_runner(model, device=device, prompts=prompts, negative_prompt=negative_prompt, call_args=call_args)
        sampler = make_sampler(runner, sampler, steps=steps, guidance=guidance, height=height, width=width,
                               num_frames=num_frames)
        if not isinstance(profile, Profile):
            profile = profile_for(runner, sampler, profile, samples=calib_samples, progress=progress)
    profile_s = time.perf_counter() - start

    def search(artifacts: Path | None, checkpoints: Path | None) -> tuple[Plan, SearchContext, float]:
        from planner.search._cost import cost_meter

        start = time.perf_counter()
        ctx = context
        if ctx is None:
            ctx = SearchContext.build(runner, sampler, profile, samples=calib_samples, progress=progress,
                                      artifacts=artifacts, checkpoints=checkpoints, costs=costs or "measured")
        else:  # a shared context: this search's by-products go to this plan's folders
            ctx = ctx.with_costs(costs or ctx.costs)
            ctx.artifacts, ctx.checkpoints = artifacts, checkpoints
        if budget.speedup is not None and not budget.speed_met(ctx.max_speedup()):
            raise PlannerError(f"budget {budget.label()} cannot be met: even reusing every block at every step but "
                               f"the first gives {ctx.max_speedup():.2f}x{' in FLOPs' if ctx.costs == 'flops' else ''}")
        ctx.cost = cost_meter(ctx)
        try:
            with ctx.cost:
                plan = chosen.search(ctx, budget)
        finally:
            cost, ctx.cost = ctx.cost, None
        search_s = time.perf_counter() - start
        # every strategy's record says what its search cost (the calibration reference run not included)
        plan.provenance.params["search_cost"] = cost.to_dict()
        pred = plan.prediction
        if not budget.met(pred.speedup, pred.calib_error):
            raise PlannerError(f"strategy {chosen.name} returned a plan that misses the budget "
                               f"({pred.speedup:.2f}x, error {pred.calib_error:.4f})")
        return plan, ctx, search_s

    if out is None:
        plan, context, search_s = search(None, None)
        return SearchOutcome(plan, context, chosen, profile_s, search_s, None, plan.provenance.params["search_cost"])
    # The plan and its by-products (a front, a router) are one artifact: staged, then published together;
    # checkpoints go straight to the plan's folder, where --resume finds them after a kill.
    out = Path(out)
    with staged_plan(out) as staged:
        plan, context, search_s = search(staged.folder, artifacts_dir(out))
        staged.plan = plan
    context.artifacts = artifacts_dir(out)
    return SearchOutcome(plan, context, chosen, profile_s, search_s, out, plan.provenance.params["search_cost"])


def search_plan(model: Any, budget: str | float | Budget | None = None, *, strategy: str | Strategy = "greedy",
                max_error: float | None = None, sampler: Any = None, profile: Any = None, calib_samples: int = 8,
                out: str | Path | None = None, device: str = "auto", progress: bool = False,
                context: SearchContext | None = None, prompts: Any = None, negative_prompt: str | None = None,
                call_args: dict | None = None, steps: int | None = None, guidance: float | None = None,
                height: int | None = None, width: int | None = None, num_frames: int | None = None,
                costs: str | None = None, **settings: Any) -> Plan:
    """A cache plan for ``model`` that meets ``budget``, found by ``strategy``.

    ``model``: a :class:`~planner.runner.Runner`, a diffusers pipeline the zoo knows, or a model spec
    (``digits-dit``, a folder). ``budget``: ``"2x"`` (the default), ``"60%"`` or a speedup; or ``max_error`` (relative
    L1 of the final latents on the calibration inputs) to minimise time under an error target.
    ``settings``: the strategy's settings (``planner strategies NAME`` lists them). ``sampler``: a
    :class:`~planner.runner.Sampler` (default: the model's). ``profile``: a Profile or its folder
    (default: the one in ``profiles/`` for this model, sampler and device, made when missing).
    ``calib_samples``: calibration inputs (seeds 0..N-1). ``out``: write the plan there.
    ``context``: a :class:`~planner.search.context.SearchContext` to search on instead (several
    searches on one model share its calibration run; ``model``, ``sampler`` and ``profile`` are then
    unused). ``prompts`` (a list, a ``.txt``/``.jsonl`` file), ``negative_prompt``, ``call_args`` and
    ``steps``, ``guidance``, ``height``, ``width``, ``num_frames``: the calibration inputs and the
    sampler, as for :func:`planner.runner.as_runner` and :func:`planner.runner.make_sampler`.
    ``costs``: what the budget is in, ``measured`` (the profile's costs, the default; a shared context's own)
    or ``flops`` (the FLOPs the profile counted: the speedup a large model on an accelerator approaches).
    Raises PlannerError (one line) when the settings are wrong or no plan meets the budget.
    """
    return run_search(model, budget, strategy=strategy, max_error=max_error, sampler=sampler, profile=profile,
                      calib_samples=calib_samples, out=out, device=device, progress=progress, context=context,
                      prompts=prompts, negative_prompt=negative_prompt, call_args=call_args, steps=steps,
                      guidance=guidance, height=height, width=width, num_frames=num_frames, costs=costs,
                      **settings).plan
