"""What a plan really gives on held-out seeds: wall-clock speedup and quality against full compute.

Seeds: evaluation runs on held-out seeds (:mod:`planner.seeds`), never on a plan's calibration seeds
unless forced.

Timing (``time_against_reference``): warm-up first, then the reference (full compute) and the
contenders run interleaved, ``R A R A ...`` or with several contenders ``R A B C R A B C R ...``;
each contender's run is paired with the mean of the reference runs just before and after it, and
its speedup is the median of those per-run ratios, with their min-max spread. Drifting machine
load (other jobs on a shared box) so hits both sides of every ratio alike. Set-up such as
installing a plan's hooks happens outside the timer; on a GPU every run is fenced by
``torch.cuda.synchronize``.

Quality (``quality``): pooled PSNR (the headline), mean, 5th-percentile and worst per-image PSNR,
SSIM, MSE and relative L1 against the full run from the same seeds (:mod:`planner.metrics`); and
where the model has a meter of its own (the digit models: the classifier's accuracy, the Frechet
distance of classifier features to the real digits; digits-mmdit: adherence to the prompt's digit
and attributes), its scores for both runs.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from planner.errors import PlannerError
from planner.profile.timing import gc_paused
from planner.seeds import EVAL_SEED_BASE, check_held_out, evaluation_seeds, format_seeds

REFERENCE = "full"


# --------------------------------------------------------------------------- timing


def _sync_for(device: torch.device | str) -> Callable[[], None]:
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


@dataclass
class Contender:
    """One way of sampling the evaluation inputs: ``run()`` returns its output; ``context`` (optional) is
    entered just before and left just after each run, outside the timer (e.g. installing a plan's hooks)."""

    run: Callable[[], Any]
    context: Callable[[], AbstractContextManager] | None = None


@dataclass
class Timing:
    """A contender's timed runs, each paired with the reference time around it (mean of the reference
    runs just before and after)."""

    seconds: list[float]
    reference_seconds: list[float]

    @property
    def ratios(self) -> list[float]:
        return [r / s for r, s in zip(self.reference_seconds, self.seconds)]

    @property
    def speedup(self) -> float:
        """Median over runs of reference time / contender time."""
        return statistics.median(self.ratios)

    @property
    def speedup_range(self) -> tuple[float, float]:
        """Min and max of the per-run ratios."""
        return min(self.ratios), max(self.ratios)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    def to_dict(self) -> dict:
        lo, hi = self.speedup_range
        return {"median_s": self.median_s, "min_s": min(self.seconds), "max_s": max(self.seconds),
                "speedup": self.speedup, "speedup_range": [lo, hi], "runs": len(self.seconds)}


@dataclass
class TimedRuns:
    """What :func:`time_against_reference` measured: timings, the last output of every run, the call order."""

    timings: dict[str, Timing]
    reference_seconds: list[float]
    outputs: dict[str, Any]
    order: list[str] = field(default_factory=list)


def interleaved_order(names: list[str], repeats: int, reference_every: int) -> list[str]:
    """The timed sequence: the reference first, then ``repeats`` rounds of the contenders in turn, the
    reference again after every ``reference_every`` contenders and at the end: ``R A B R A B R``."""
    order = [REFERENCE]
    for _ in range(repeats):
        for i, name in enumerate(names):
            order.append(name)
            if (i + 1) % reference_every == 0 or i == len(names) - 1:
                order.append(REFERENCE)
    return order


def time_against_reference(reference: Contender, contenders: dict[str, Contender], repeats: int = 5,
                           warmup: int = 1, reference_every: int = 4, device: torch.device | str = "cpu",
                           progress: Callable[[str], None] | None = None,
                           clock: Callable[[], float] = time.perf_counter) -> TimedRuns:
    """Time every contender against ``reference``, interleaved (see the module docstring).

    ``warmup`` untimed rounds of all runs come first. Each contender's ``Timing`` pairs its runs with
    the mean of the reference runs bracketing them. Outputs are the last run's of each (runs are
    deterministic, so any run's would do). ``progress(name)`` is called after every run.
    """
    if REFERENCE in contenders:
        raise PlannerError(f"a contender may not be named {REFERENCE!r}")
    if repeats < 1 or warmup < 0:
        raise PlannerError(f"repeats must be at least 1 and warm-up rounds at least 0, got {repeats} and {warmup}")
    runs = {REFERENCE: reference, **contenders}
    sync = _sync_for(device)
    outputs: dict[str, Any] = {}

    def timed(name: str) -> float:
        contender = runs[name]
        with contender.context() if contender.context else contextlib.nullcontext():
            sync()
            start = clock()
            outputs[name] = contender.run()
            sync()
            seconds = clock() - start
        if progress:
            progress(name)
        return seconds

    for _ in range(warmup):
        for name in runs:
            timed(name)
    order = interleaved_order(list(contenders), repeats, max(1, reference_every))
    with gc_paused():
        seconds = [timed(name) for name in order]
    ref_positions = [i for i, name in enumerate(order) if name == REFERENCE]
    timings: dict[str, Timing] = {name: Timing([], []) for name in contenders}
    for i, name in enumerate(order):
        if name == REFERENCE:
            continue
        before = max(p for p in ref_positions if p < i)
        after = min(p for p in ref_positions if p > i)
        timings[name].seconds.append(seconds[i])
        timings[name].reference_seconds.append((seconds[before] + seconds[after]) / 2)
    return TimedRuns(timings, [seconds[p] for p in ref_positions], outputs, order)


# --------------------------------------------------------------------------- quality


def quality(output: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """The scores of :func:`planner.metrics.compare` of ``output`` against ``reference`` (images in [0, 1])."""
    from planner.metrics import compare

    return compare(output, reference)


# Column titles of the meters' scores in reports.
METER_LABELS = {"accuracy": "digit accuracy", "frechet": "Frechet distance", "thickness": "thickness acc.",
                "slant": "slant acc.", "size": "size acc."}


def meter_scores(runner, images: torch.Tensor, conditions: list[Any]) -> dict[str, float | None]:
    """The model's own quality scores of ``images`` drawn for ``conditions`` (``{}`` for models without a meter)."""
    return runner.meter(images, conditions) if runner.meter is not None else {}


# --------------------------------------------------------------------------- one plan


def evaluate_plan(runner, sampler, plan, seeds: list[int], repeats: int = 5, warmup: int = 1,
                  force: bool = False, progress: Callable[[str], None] | None = None) -> dict:
    """Realized speedup and quality of ``plan`` against full compute on held-out ``seeds``.

    Refuses seeds overlapping the plan's calibration seeds unless ``force`` (before any model runs).
    Returns a JSON-ready report: ``seeds`` (compact text), ``n``, ``full_s`` / ``plan_s`` (medians)
    with ``full_range_s`` / ``plan_range_s``, ``speedup`` (median of interleaved per-run ratios),
    ``speedup_range`` (their min and max), ``repeats``, the :func:`quality` scores, ``executor`` stats,
    and for models with a meter ``meter`` = ``{"full": ..., "plan": ...}``, its scores of each run.
    """
    return evaluate_plan_with_outputs(runner, sampler, plan, seeds, repeats, warmup, force, progress)[0]


def evaluate_plan_with_outputs(runner, sampler, plan, seeds: list[int], repeats: int = 5, warmup: int = 1,
                               force: bool = False, progress: Callable[[str], None] | None = None,
                               conditions: list[Any] | None = None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """:func:`evaluate_plan`'s report plus the full and planned outputs (images) it compared.
    ``conditions``: one per seed (default: the runner's conditions for the seeds)."""
    from planner.executor import apply_plan

    if not seeds:
        raise PlannerError("no evaluation seeds given")
    check_held_out(seeds, plan.provenance.calib_seeds, force)
    sampler = runner.resolve(sampler)
    plan.check_sampler(runner, sampler)
    if conditions is None:
        conditions = runner.conditions(len(seeds), seed=seeds[0])
    elif len(conditions) != len(seeds):
        raise PlannerError(f"{len(conditions)} conditions for {len(seeds)} seeds")
    handles = []

    def install():
        handles.append(apply_plan(runner.pipe, plan))
        return handles[-1]

    timed = time_against_reference(
        Contender(lambda: runner.run(conditions, seeds, sampler)),
        {"plan": Contender(lambda: runner.run(conditions, seeds, sampler), context=install)},
        repeats=repeats, warmup=warmup, reference_every=1, device=runner.device, progress=progress,
    )
    full, planned = timed.outputs[REFERENCE], timed.outputs["plan"]
    t, ref = timed.timings["plan"], timed.reference_seconds
    report = {
        "plan_strategy": plan.provenance.strategy,
        "seeds": format_seeds(seeds),
        "n": len(seeds),
        "repeats": repeats,
        "full_s": statistics.median(ref),
        "full_range_s": [min(ref), max(ref)],
        "plan_s": t.median_s,
        "plan_range_s": [min(t.seconds), max(t.seconds)],
        "speedup": t.speedup,
        "speedup_range": list(t.speedup_range),
        "predicted_speedup": plan.prediction.speedup,
        **quality(planned, full),
        "executor": _executor_summary(handles[-1].stats()),
    }
    if runner.meter is not None:
        report["meter"] = {"full": meter_scores(runner, full, conditions), "plan": meter_scores(runner, planned, conditions)}
    return report, full, planned


def _executor_summary(stats: dict) -> dict:
    """What the executor reports about the plan's last run: share of module calls computed, fallbacks."""
    return {"computed_fraction": stats.get("computed_fraction"), "fallbacks": stats.get("fallbacks")}


def verify_plan(runner, sampler, plan, samples: int = 8, repeats: int = 3, seed_start: int = EVAL_SEED_BASE) -> dict:
    """:func:`evaluate_plan` on ``samples`` held-out seeds from ``seed_start`` (``planner search --verify``)."""
    return evaluate_plan(runner, sampler, plan, evaluation_seeds(samples, seed_start), repeats=repeats)


def eval_markdown(report: dict) -> str:
    """A markdown table of an :func:`evaluate_plan` report: full compute vs the plan."""
    def num(x, fmt):
        if x is None:
            return "-"
        return "inf" if isinstance(x, float) and math.isinf(x) else format(x, fmt)

    meter = report.get("meter") or {"full": {}, "plan": {}}
    names = list(meter["full"])
    head = ("| run | time s (median, min-max) | speedup (min-max) | PSNR dB pooled | mean | p5 | worst | SSIM | rel. L1 |"
            + "".join(f" {METER_LABELS.get(n, n)} |" for n in names))
    sep = "|---" * (9 + len(names)) + "|"
    lo, hi = report["full_range_s"]
    full = f"| full compute | {report['full_s']:.3f} ({lo:.3f}-{hi:.3f}) | 1.00x |" + " |" * 6
    lo, hi = report["plan_range_s"]
    slo, shi = report["speedup_range"]
    plan = (f"| plan ({report['plan_strategy']}) | {report['plan_s']:.3f} ({lo:.3f}-{hi:.3f}) | "
            f"{report['speedup']:.2f}x ({slo:.2f}-{shi:.2f}) | "
            + " | ".join(num(report[k], ".2f") for k in ("psnr", "psnr_mean", "psnr_p5", "psnr_worst"))
            + f" | {num(report['ssim'], '.4f')} | {num(report['rel_l1'], '.4f')} |")
    for n in names:
        fmt = ".1f" if n == "frechet" else ".3f"
        full += f" {num(meter['full'][n], fmt)} |"
        plan += f" {num(meter['plan'][n], fmt)} |"
    note = (f"\n\n{report['n']} held-out seeds {report['seeds']}, {report['repeats']} interleaved timed runs per side "
            "after a warm-up; speedup = median of per-run ratios. PSNR pooled: from the MSE over all images; mean, "
            "p5, worst: of the per-image PSNRs.")
    return f"{head}\n{sep}\n{full}\n{plan}{note}"
