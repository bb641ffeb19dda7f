"""The bench itself: build every method's contender, time them all against full compute, score them."""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import sys
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from planner.errors import PlannerError
from planner.evaluate import REFERENCE, Contender, meter_scores, quality, time_against_reference, timing_noise
from planner.metrics import per_image_mse
from planner.seeds import check_held_out, evaluation_seeds

KIND_REFERENCE, KIND_OURS, KIND_BASELINE, KIND_PEER = "reference", "ours", "baseline", "peer"
# Registered strategies that re-implement other people's methods: baselines, not ours.
BASELINE_STRATEGIES = {"uniform": "FORA", "smoothcache": "SmoothCache"}
# The baselines run at their own default level, ``auto``: block and sub-layer reuse both searched, the
# one with the lower calibration error kept, so they are shown at their best.
# HarmoniCa trains at a third of its default rollouts on half its beta grid, so that the whole
# default bench fits in 30 minutes per model on 2 CPU cores (its defaults took 574 s per budget
# there); ``--param harmonica:rounds=12`` and the like restore them. Every setting that differs from
# a strategy's declared default is listed in the results (``reduced``).
DEFAULT_PARAMS = {
    "harmonica": {"rounds": 4, "betas": [0.01, 0.03]},
}
FEWER_STEPS = "fewer steps"
NO_CACHE = "no cache"


@dataclass
class BenchConfig:
    """What to run. ``strategies=None`` means every registered strategy; ``params`` maps a strategy to its
    search parameters; ``peers``/``sweeps``/``peer_warmups`` select peer tools, their knob values and warm-ups."""

    budgets: list[str] = field(default_factory=lambda: ["1.5x", "2x", "3x"])
    # What our strategies' budgets are in (planner.profile.flop_costs): the profile's measured times, its
    # FLOPs, or both (one plan each), so that each speed axis has plans searched for it.
    costs: list[str] = field(default_factory=lambda: ["measured"])
    strategies: list[str] | None = None
    params: dict[str, dict] = field(default_factory=dict)
    peers: list[str] | None = None
    sweeps: dict[str, list[float]] = field(default_factory=dict)
    peer_warmups: dict[str, list[int]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: evaluation_seeds(32))
    # Timed on the first ``timed_seeds`` of ``seeds`` (``None``: all), scored on all of them: a speed ratio
    # settles on a few dozen images, a pooled PSNR needs hundreds (one drifting image decides it on 32).
    timed_seeds: int | None = None
    calib_samples: int = 8
    repeats: int = 5
    # More timed rounds, up to this many in all, while the timing is noisy (time_against_reference)
    max_repeats: int | None = None
    warmup: int = 1
    reference_every: int = 1
    fewer_steps: bool = True
    # Search again where our plan for the largest budget on measured costs ran slower than that budget
    # (_top_up_points), so that each strategy's realized front reaches every budget asked for.
    top_up: bool = True
    profile: str | None = None
    out: Path | None = None
    # Where the files go while the bench runs (``planner bench``: a temporary folder that becomes ``out``
    # as a whole at the end); recorded paths name ``out``. ``None``: ``out`` itself.
    write_to: Path | None = None
    progress: bool = True


@dataclass
class Point:
    """One method at one setting, before and after it is measured."""

    method: str
    kind: str
    setting: str
    budget: str | None = None
    status: str = "ok"
    # How the method samples given inputs: ``draw(conditions, seeds)``, inside ``context()`` where it has one
    # (a plan's hooks); ``None`` once it failed.
    draw: Callable[[list, list[int]], Any] | None = None
    context: Callable[[], AbstractContextManager] | None = None
    predicted_speedup: float | None = None
    calib_error: float | None = None
    search_s: float | None = None
    plan: str | None = None
    params: dict | None = None
    flops: int | None = None
    # Ours searched on measured costs: the same search, in the same context, for another budget
    search_again: Callable[[Any], "Point"] | None = None

    @property
    def key(self) -> str:
        return f"{self.method} | {self.setting}"

    def contender(self, conditions: list, seeds: list[int]) -> Contender:
        """This method sampling ``conditions`` from ``seeds``, as the timer and the scorer run it."""
        return Contender(lambda draw=self.draw: draw(conditions, seeds), context=self.context)


@dataclass
class BenchResult:
    """The measured rows (one dict per point, the columns of the CSV), peers skipped and why, run facts, and
    per row the MSE of each held-out image (``None`` for a row not scored), which the margins' intervals draw on."""

    rows: list[dict]
    skipped: dict[str, str]
    info: dict[str, Any]
    image_mse: list | None = None
    _margins: dict = field(default_factory=dict, repr=False)

    def margins(self, targets: list[float]) -> dict:
        """:func:`planner.bench.margins.margins` of the rows at ``targets``, with intervals where the images'
        errors are known; computed once per set of targets."""
        from planner.bench.margins import margins

        key = tuple(targets)
        if key not in self._margins:
            self._margins[key] = margins(self.rows, targets, self.image_mse)
        return self._margins[key]


def _say(config: BenchConfig, text: str) -> None:
    if config.progress:
        print(text, file=sys.stderr, flush=True)


def _load_average() -> float | None:
    """The machine's load average over the last minute (``None`` where the OS has none): other jobs'
    share of the CPUs while the bench timed."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def check_timed_seeds(timed: int | None, n: int, name: str = "timed seeds") -> None:
    """PlannerError unless ``timed`` (``None``: all of them) is from 1 to the ``n`` seeds given."""
    if timed is not None and not 1 <= timed <= n:
        raise PlannerError(f"{name} must be from 1 to the {n} seeds given, got {timed}")


def run_bench(runner, sampler, config: BenchConfig) -> BenchResult:
    """Run the whole bench on ``runner``/``sampler`` (see the package docstring); nothing is written here."""
    from planner.bench.peers import PEERS, peer_runs

    start = time.perf_counter()
    sampler = runner.resolve(sampler)
    seeds = list(config.seeds)
    if not seeds:
        raise PlannerError("no evaluation seeds given")
    check_timed_seeds(config.timed_seeds, len(seeds))
    check_held_out(seeds, range(config.calib_samples))
    conditions = runner.conditions(len(seeds), seed=seeds[0])
    n_timed = config.timed_seeds or len(seeds)

    points = strategy_points(runner, sampler, config)
    if config.fewer_steps:
        points += fewer_steps_points(runner, sampler, config.budgets)
    peers, skipped = peer_runs(runner, sampler, list(PEERS) if config.peers is None else config.peers, config.sweeps,
                              config.peer_warmups, calib_samples=config.calib_samples)
    for name, why in skipped.items():
        _say(config, f"peer {name} skipped: {why}")
    for p in peers:
        points.append(Point(p.method, KIND_PEER, p.setting, draw=lambda c, s, run=p.run: run(c, s, sampler)))

    load_before = _load_average()
    timed, reference_flops = _time_all(runner, sampler, conditions[:n_timed], seeds[:n_timed], points, config)
    top_ups = _top_up_points(points, timed, config) if config.top_up else []
    if top_ups:
        more, _ = _time_all(runner, sampler, conditions[:n_timed], seeds[:n_timed], top_ups, config)
        timed.timings.update(more.timings)
        timed.outputs.update(more.outputs)
        points += top_ups
    noise = timing_noise(timed.timings)
    if noise is not None:
        noise.update(load_before=load_before, load_after=_load_average(), cpus=os.cpu_count())
        if noise["noisy"]:
            _say(config, f"noisy timing: realized speedups uncertain by about {noise['speedup_se']:.1%} "
                         "(--max-repeats adds rounds while it is; a machine with nothing else running narrows it)")
    outputs = timed.outputs if n_timed == len(seeds) else _score_all(runner, sampler, conditions, seeds, points, config)
    rows = _rows(runner, conditions, points, timed, outputs, sampler, reference_flops)
    image_mse = [per_image_mse(outputs[REFERENCE], outputs[REFERENCE])] + [
        per_image_mse(outputs[p.key], outputs[REFERENCE]) if p.key in timed.timings else None for p in points]
    strategies = dict.fromkeys(p.method for p in points if p.kind != KIND_PEER and p.method != FEWER_STEPS)
    given = {n: {**DEFAULT_PARAMS.get(n, {}), **config.params.get(n, {})} for n in strategies}
    info = {"search_params": {n: v for n, v in given.items() if v}, "reduced": reduced_settings(given),
            "flops_counted_with": "torch.utils.flop_counter formulas (planner.bench.flops)", "model": runner.spec,
            "seeds": seeds, "n": len(seeds), "timed_seeds": n_timed, "warmup": config.warmup,
            "repeats": noise["runs"] if noise else config.repeats,  # more than asked where the timing was noisy
            "sampler": sampler.to_dict(), "budgets": config.budgets,
            "top_up": [{"method": p.method, "budget": p.budget} for p in top_ups], "timing_noise": noise,
            "wall_s": time.perf_counter() - start}
    return BenchResult(rows, skipped, info, image_mse)


# --------------------------------------------------------------------------- ours and baselines


def strategy_points(runner, sampler, config: BenchConfig) -> list[Point]:
    """One point per (budget, costs, strategy): the plan searched on the calibration inputs (failures become
    points carrying their message), saved under ``config.out/plans`` when ``out`` is set."""
    from planner.profile.store import profile_for
    from planner.search import get_strategy, strategy_names
    from planner.search.budget import Budget
    from planner.search.context import SearchContext

    names = strategy_names() if config.strategies is None else list(config.strategies)
    for name in names:
        get_strategy(name)  # an unknown name is bad input: refuse before anything runs
    unknown = sorted(set(config.params) - set(names))
    if unknown:
        raise PlannerError(f"--param names strategy {unknown[0]!r}, which this bench does not run")
    if not names:
        return []
    budgets = [Budget.parse(b) for b in config.budgets]
    profile = profile_for(runner, sampler, config.profile, samples=config.calib_samples, progress=config.progress)
    # The searches run quietly: one summary line each (their own progress bars would bury the bench log).
    context = SearchContext.build(runner, sampler, profile, samples=config.calib_samples, progress=False)
    # {costs asked for: context}; a FLOP-costed profile prices both alike, so it is searched once
    contexts: dict[str, SearchContext] = {}
    for costs in config.costs:
        ctx = context.with_costs(costs)
        if all(c.costs != ctx.costs for c in contexts.values()):
            contexts[costs] = ctx
    return [_strategy_point(name, budget, costs, ctx, runner, sampler, config)
            for budget in budgets for costs, ctx in contexts.items() for name in names]


def _strategy_point(name: str, budget, costs: str, context, runner, sampler, config: BenchConfig) -> Point:
    """The point of strategy ``name`` searched for ``budget`` in ``context`` (which prices plans by the
    ``costs`` asked for; a failure is a point carrying its message)."""
    from planner.executor import apply_plan
    from planner.search.api import search_plan

    kind = KIND_BASELINE if name in BASELINE_STRATEGIES else KIND_OURS
    flops = costs == "flops"
    label = budget.label() + (" FLOPs" if flops else "")
    point = Point(name, kind, label, budget=label)
    out = (Path(config.write_to or config.out) / "plans" / f"{name}-{budget.label()}{'-flops' if flops else ''}.json"
           if config.out is not None else None)
    t0 = time.perf_counter()
    try:
        point.params = {**DEFAULT_PARAMS.get(name, {}), **config.params.get(name, {})}
        plan = search_plan(None, budget, strategy=name, context=context, out=out, **point.params)
    except Exception as exc:  # noqa: BLE001 - one failing strategy must not end a 30-minute bench
        point.status = str(exc) if isinstance(exc, PlannerError) else f"failed: {type(exc).__name__}: {exc}"
        point.search_s = time.perf_counter() - t0
        _say(config, f"{name} {label}: {point.status}")
        return point
    point.search_s = time.perf_counter() - t0
    point.params = plan.provenance.params
    pred = plan.prediction
    point.predicted_speedup, point.calib_error = pred.speedup, pred.calib_error
    if out is not None:
        point.plan = str(Path(config.out) / "plans" / out.name)
    point.draw = lambda conditions, seeds: runner.run(conditions, seeds, sampler)
    point.context = lambda plan=plan: apply_plan(runner.pipe, plan)
    if not flops:
        point.search_again = lambda b: _strategy_point(name, b, costs, context, runner, sampler, config)
    _say(config, f"{name} {label}: searched in {point.search_s:.1f} s, predicted {pred.speedup:.2f}x, "
                 f"calibration error {pred.calib_error:.4f}")
    return point


def _top_up_points(points: list[Point], timed, config: BenchConfig) -> list[Point]:
    """Each of our plans searched on measured costs for the largest budget that ran slower than that budget,
    searched once more with the budget raised by the shortfall (predicted x largest / realized).

    A plan meets its budget on the profile's measured costs; the run can be slower than they say (they were
    timed under other load, or the latency model misses an overhead), and a strategy whose realized front
    stops short of the largest budget has no reading there at all. The new plan is labelled with the budget
    it was searched for ("3.15x (top-up for 3x)") and measured like every other point; one whose search
    fails is left out (said on the log)."""
    from planner.search.budget import Budget

    largest = max((b for b in map(Budget.parse, config.budgets) if b.speedup is not None),
                  key=lambda b: b.speedup, default=None)
    if largest is None:
        return []
    out = []
    for p in points:
        if p.search_again is None or p.budget != largest.label() or p.key not in timed.timings:
            continue
        realized = timed.timings[p.key].speedup
        if realized >= largest.speedup:
            continue
        raised = Budget(speedup=round(p.predicted_speedup * largest.speedup / realized, 2))
        _say(config, f"{p.key}: ran at {realized:.2f}x, searching again for {raised.label()}")
        again = p.search_again(raised)
        again.setting = f"{again.setting} (top-up for {largest.label()})"
        if again.draw is not None:
            out.append(again)
    return out


def fewer_steps_points(runner, sampler, budgets: list[str]) -> list[Point]:
    """Plain sampling with ``floor(steps / s)`` steps for each speed budget ``s``: the most steps that still
    meet the budget, as every strategy's plan must (``round`` would leave 17 of 50 steps at 2.94x for 3x)."""
    from planner.search.budget import Budget

    points = []
    for label in budgets:
        budget = Budget.parse(label)
        if budget.speedup is None:
            continue
        steps = max(1, math.floor(sampler.steps / budget.speedup + 1e-9))
        if steps >= sampler.steps:
            continue
        fewer = replace(sampler, steps=steps)
        points.append(Point(FEWER_STEPS, KIND_BASELINE, f"{steps} steps", budget=budget.label(),
                            predicted_speedup=sampler.steps / steps,
                            draw=lambda conditions, seeds, s=fewer: runner.run(conditions, seeds, s)))
    return points


# --------------------------------------------------------------------------- measuring


def reduced_settings(given: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """Per strategy, every setting the bench gives that differs from the strategy's declared default:
    ``{"harmonica": {"rounds": {"bench": 4, "default": 12}}}`` (what a report must say was reduced)."""
    from planner.search import get_strategy

    out: dict[str, dict[str, dict]] = {}
    for name, params in given.items():
        try:
            fields = get_strategy(name).Settings.model_fields
        except Exception:  # noqa: BLE001 - a strategy without declared settings has no defaults to compare
            continue
        for key, value in params.items():
            if key not in fields:
                continue
            default = fields[key].get_default(call_default_factory=True)
            default = list(default) if isinstance(default, tuple) else default
            if value != default:
                out.setdefault(name, {})[key] = {"bench": value, "default": default}
    return out


def _time_all(runner, sampler, conditions, seeds, points: list[Point], config: BenchConfig):
    """Count every method's FLOPs in a first untimed round (it doubles as the first warm-up round), then
    time them all against full compute; returns the timed runs and the reference's FLOPs."""
    from tqdm.auto import tqdm

    from planner.bench.flops import count_flops

    k = sum(1 for p in points if p.draw is not None)
    warmup = max(0, config.warmup - 1)
    total = (k + 1) + warmup * (k + 1) + 1 + config.repeats * (k + math.ceil(k / max(1, config.reference_every)))
    bar = tqdm(total=total, desc="bench runs", disable=not config.progress, file=sys.stderr)
    try:
        reference_flops, _ = count_flops(lambda: runner.run(conditions, seeds, sampler))
        bar.update(1)
        for p in points:
            if p.draw is None:
                continue
            contender = p.contender(conditions, seeds)
            try:
                p.flops, _ = count_flops(contender.run, contender.context)
            except Exception as exc:  # noqa: BLE001 - a peer that crashes on this model must not end the bench
                p.status, p.draw = f"failed: {type(exc).__name__}: {exc}".replace("\n", " "), None
                _say(config, f"{p.key}: {p.status}")
            bar.update(1)
        contenders = {p.key: p.contender(conditions, seeds) for p in points if p.draw is not None}
        round_runs = len(contenders) + math.ceil(len(contenders) / max(1, config.reference_every))

        def advance(name: str) -> None:
            if bar.n >= bar.total:  # a round added while the timing is noisy (max_repeats)
                bar.total += round_runs
            bar.update(1)

        timed = time_against_reference(
            Contender(lambda: runner.run(conditions, seeds, sampler)), contenders, repeats=config.repeats,
            warmup=warmup, reference_every=config.reference_every, device=runner.device,
            progress=advance, max_repeats=config.max_repeats,
        )
        return timed, reference_flops
    finally:
        bar.close()


def _score_all(runner, sampler, conditions, seeds, points: list[Point], config: BenchConfig) -> dict[str, Any]:
    """Every timed method's output (and full compute's, under ``REFERENCE``) on all of ``seeds``, untimed."""
    from tqdm.auto import tqdm

    out = {REFERENCE: runner.run(conditions, seeds, sampler)}
    for p in tqdm([p for p in points if p.draw is not None], desc="scored runs", disable=not config.progress,
                  file=sys.stderr):
        contender = p.contender(conditions, seeds)
        with contender.context() if contender.context else contextlib.nullcontext():
            out[p.key] = contender.run()
    return out


def _rows(runner, conditions, points: list[Point], timed, outputs: dict[str, Any], sampler,
          reference_flops: int) -> list[dict]:
    """One row per point: speed from ``timed``, quality of its entry in ``outputs`` against full compute's."""
    from planner.bench.flops import flop_speedup

    full = outputs[REFERENCE]
    ref = timed.reference_seconds
    reference = {"method": NO_CACHE, "kind": KIND_REFERENCE, "setting": f"{sampler.steps} steps", "budget": None,
                 "status": "ok", "speedup": 1.0, "speedup_min": None, "speedup_max": None,
                 "median_s": statistics.median(ref), "flops": reference_flops, "flop_speedup": 1.0,
                 "predicted_speedup": 1.0, "calib_error": 0.0, "search_s": None,
                 **quality(full, full), **meter_scores(runner, full, conditions), "plan": None,
                 "params": None}
    rows = [reference]
    for p in points:
        row = {"method": p.method, "kind": p.kind, "setting": p.setting, "budget": p.budget, "status": p.status,
               "speedup": None, "speedup_min": None, "speedup_max": None, "median_s": None,
               "flops": p.flops, "flop_speedup": flop_speedup(reference_flops, p.flops),
               "predicted_speedup": p.predicted_speedup, "calib_error": p.calib_error, "search_s": p.search_s}
        if p.key in timed.timings:
            t = timed.timings[p.key]
            lo, hi = t.speedup_range
            row.update(speedup=t.speedup, speedup_min=lo, speedup_max=hi, median_s=t.median_s)
            row.update(quality(outputs[p.key], full), **meter_scores(runner, outputs[p.key], conditions))
        row["plan"], row["params"] = p.plan, json.dumps(p.params, sort_keys=True) if p.params else None
        rows.append(row)
    # Every row has every column (unmeasured ones None), so a failed point reads like the others.
    return [{**dict.fromkeys(reference), **row} for row in rows]
