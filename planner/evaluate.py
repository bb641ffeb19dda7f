"""What a plan really gives on held-out seeds: wall-clock speedup and quality against full compute.

Seeds: evaluation runs on held-out seeds (:mod:`planner.seeds`), never on a plan's calibration seeds
unless forced.

Timing (``time_against_reference``): warm-up first, then the reference (full compute) and the
contenders run interleaved, ``R A R A ...`` or with several contenders ``R A B C R A B C R ...``;
each contender's run is paired with the mean of the reference runs just before and after it, and
its speedup is the median of those per-run ratios, with their min-max spread. Drifting machine
load (other jobs on a shared box) so hits both sides of every ratio alike; what it does not cancel
shows as scatter of the per-run ratios, which ``timing_noise`` turns into a standard error that the
reports state (and flag above ``NOISY_TIMING``). Set-up such as
installing a plan's hooks happens outside the timer; on a GPU every run is fenced by
``torch.cuda.synchronize``.

Quality (``quality``): pooled PSNR (the headline) with its bootstrap interval over the images, mean,
5th-percentile and worst per-image PSNR, SSIM, MSE and relative L1 against the full run from the same
seeds (:mod:`planner.metrics`); and where the model has a meter of its own (the digit models: the
classifier's accuracy, the Frechet distance of classifier features to the real digits; digits-mmdit:
adherence to the prompt's digit and attributes), its scores for both runs.
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
from planner.metrics import PSNR_INTERVAL_LEVEL
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


# A realized speedup whose stated standard error is above this share of itself is flagged as noisy in reports:
# on a steep front (quality falling fast with speed) a few percent of speed move a matched PSNR by a dB or
# more. With a full run beside every timed run the stated error tracks how far the timer's medians move
# from session to session (benchmarks/results/timing_noise.md).
NOISY_TIMING = 0.05


def timing_noise(timings: dict[str, Timing]) -> dict[str, Any] | None:
    """How far the timed runs can be trusted, from the scatter of each contender's per-run speed ratios.

    ``ratio_sd``: the relative standard deviation of one run's ratio (of log ratios around each contender's
    mean, pooled over contenders by degrees of freedom); ``speedup_se``: what that leaves on a speedup
    from ``runs`` runs (``ratio_sd / sqrt(runs)``, the error of their mean; the timer reports their median);
    ``noisy``: above ``NOISY_TIMING``. ``None`` when no contender has two runs.
    """
    squares, dof, runs = 0.0, 0, []
    for t in timings.values():
        logs = [math.log(r) for r in t.ratios]
        if len(logs) < 2:
            continue
        mean = statistics.fmean(logs)
        squares += sum((x - mean) ** 2 for x in logs)
        dof += len(logs) - 1
        runs.append(len(logs))
    if not dof:
        return None
    ratio_sd = math.sqrt(squares / dof)
    speedup_se = ratio_sd / math.sqrt(min(runs))
    return {"ratio_sd": ratio_sd, "speedup_se": speedup_se, "runs": min(runs), "noisy": speedup_se > NOISY_TIMING}


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
                           warmup: int = 1, reference_every: int = 1, device: torch.device | str = "cpu",
                           progress: Callable[[str], None] | None = None,
                           clock: Callable[[], float] = time.perf_counter,
                           max_repeats: int | None = None) -> TimedRuns:
    """Time every contender against ``reference``, interleaved (see the module docstring).

    ``warmup`` untimed rounds of all runs come first, then ``repeats`` timed rounds; with ``max_repeats``
    above ``repeats``, more rounds follow one at a time while :func:`timing_noise` calls the runs so far
    noisy, up to ``max_repeats`` in all. Each contender's ``Timing`` pairs its runs with the mean of the
    reference runs bracketing them. Outputs are the last run's of each (runs are deterministic, so any
    run's would do). ``progress(name)`` is called after every run.
    """
    if REFERENCE in contenders:
        raise PlannerError(f"a contender may not be named {REFERENCE!r}")
    if repeats < 1 or warmup < 0:
        raise PlannerError(f"repeats must be at least 1 and warm-up rounds at least 0, got {repeats} and {warmup}")
    max_repeats = max(repeats, max_repeats or repeats)
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
    one_round = interleaved_order(list(contenders), 1, max(1, reference_every))[1:]
    order = [REFERENCE]
    with gc_paused():
        seconds = [timed(REFERENCE)]
        for done in range(1, max_repeats + 1):
            order += one_round
            seconds += [timed(name) for name in one_round]
            timings = _paired(order, seconds)
            if done >= repeats and not (timing_noise(timings) or {}).get("noisy"):
                break
    return TimedRuns(timings, [s for s, name in zip(seconds, order) if name == REFERENCE], outputs, order)


def _paired(order: list[str], seconds: list[float]) -> dict[str, Timing]:
    """Each contender's runs in ``order`` (timed ``seconds``), paired with the mean of the reference runs
    just before and after."""
    ref_positions = [i for i, name in enumerate(order) if name == REFERENCE]
    timings: dict[str, Timing] = {}
    for i, name in enumerate(order):
        if name == REFERENCE:
            continue
        before = max(p for p in ref_positions if p < i)
        after = min(p for p in ref_positions if p > i)
        timing = timings.setdefault(name, Timing([], []))
        timing.seconds.append(seconds[i])
        timing.reference_seconds.append((seconds[before] + seconds[after]) / 2)
    return timings


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
                  force: bool = False, progress: Callable[[str], None] | None = None,
                  max_repeats: int | None = None) -> dict:
    """Realized speedup and quality of ``plan`` against full compute on held-out ``seeds``.

    Refuses seeds overlapping the plan's calibration seeds unless ``force`` (before any model runs).
    Returns a JSON-ready report: ``seeds`` (compact text), ``n``, ``full_s`` / ``plan_s`` (medians)
    with ``full_range_s`` / ``plan_range_s``, ``speedup`` (median of interleaved per-run ratios),
    ``speedup_range`` (their min and max), ``repeats`` (the timed runs of the plan), ``timing_noise``
    (:func:`timing_noise`), the :func:`quality` scores, ``executor`` stats, and for models with a meter
    ``meter`` = ``{"full": ..., "plan": ...}``, its scores of each run. ``max_repeats``: more timed runs
    while the timing is noisy (:func:`time_against_reference`).
    """
    return evaluate_plan_with_outputs(runner, sampler, plan, seeds, repeats, warmup, force, progress,
                                      max_repeats=max_repeats)[0]


def evaluate_plan_with_outputs(runner, sampler, plan, seeds: list[int], repeats: int = 5, warmup: int = 1,
                               force: bool = False, progress: Callable[[str], None] | None = None,
                               conditions: list[Any] | None = None, max_repeats: int | None = None,
                               against=None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """:func:`evaluate_plan`'s report plus the full and planned outputs (images) it compared.
    ``conditions``: one per seed (default: the runner's conditions for the seeds); ``max_repeats``: see
    :func:`time_against_reference`.

    ``against``: another plan of the same model and sampler, timed in the same interleaved rounds and scored
    on the same inputs. The report then also holds ``against`` (its own timing, quality, executor stats and
    meter scores) and ``comparison``, the plan's pooled PSNR less the other's with a paired bootstrap
    interval (:func:`planner.metrics.paired_psnr_difference`)."""
    from planner.executor import apply_plan
    from planner.metrics import paired_psnr_difference, per_image_mse

    if not seeds:
        raise PlannerError("no evaluation seeds given")
    plans = {"plan": plan} if against is None else {"plan": plan, "against": against}
    for p in plans.values():  # before any model runs
        check_held_out(seeds, p.provenance.calib_seeds, force)
    sampler = runner.resolve(sampler)
    for p in plans.values():
        p.check_sampler(runner, sampler)
    if conditions is None:
        conditions = runner.conditions(len(seeds), seed=seeds[0])
    elif len(conditions) != len(seeds):
        raise PlannerError(f"{len(conditions)} conditions for {len(seeds)} seeds")
    handles: dict[str, Any] = {}

    def installer(name: str):
        def install():
            handles[name] = apply_plan(runner.pipe, plans[name])
            return handles[name]
        return install

    def run():
        return runner.run(conditions, seeds, sampler)

    timed = time_against_reference(
        Contender(run), {name: Contender(run, context=installer(name)) for name in plans},
        repeats=repeats, warmup=warmup, reference_every=1, device=runner.device, progress=progress,
        max_repeats=max_repeats,
    )
    full, ref = timed.outputs[REFERENCE], timed.reference_seconds
    report = {"seeds": format_seeds(seeds), "n": len(seeds), "full_s": statistics.median(ref),
              "full_range_s": [min(ref), max(ref)], "timing_noise": timing_noise(timed.timings)}
    sections = {name: _plan_section(runner, p, timed.timings[name], timed.outputs[name], full, handles[name],
                                    conditions) for name, p in plans.items()}
    report.update(sections["plan"])
    if against is not None:
        report["against"] = sections["against"]
        report["comparison"] = paired_psnr_difference(per_image_mse(timed.outputs["plan"], full),
                                                      per_image_mse(timed.outputs["against"], full))
    if runner.meter is not None:
        report["meter"] = {"full": meter_scores(runner, full, conditions), "plan": report.pop("meter")}
    return report, full, timed.outputs["plan"]


def _plan_section(runner, plan, timing: Timing, output: torch.Tensor, full: torch.Tensor, handle,
                  conditions: list[Any]) -> dict:
    """One plan's part of a report: its timing against the full runs around it, quality, executor stats
    and, for models with a meter, the meter's scores of its output (``meter``)."""
    section = {
        "plan_strategy": plan.provenance.strategy,
        "repeats": len(timing.seconds),
        "plan_s": timing.median_s,
        "plan_range_s": [min(timing.seconds), max(timing.seconds)],
        "speedup": timing.speedup,
        "speedup_range": list(timing.speedup_range),
        "predicted_speedup": plan.prediction.speedup,
        **quality(output, full),
        "executor": _executor_summary(handle.stats()),
    }
    if runner.meter is not None:
        section["meter"] = meter_scores(runner, output, conditions)
    return section


def _executor_summary(stats: dict) -> dict:
    """What the executor reports about the plan's last run: share of module calls computed, fallbacks."""
    return {"computed_fraction": stats.get("computed_fraction"), "fallbacks": stats.get("fallbacks")}


def verify_plan(runner, sampler, plan, samples: int = 8, repeats: int = 3, seed_start: int = EVAL_SEED_BASE) -> dict:
    """:func:`evaluate_plan` on ``samples`` held-out seeds from ``seed_start`` (``planner search --verify``)."""
    return evaluate_plan(runner, sampler, plan, evaluation_seeds(samples, seed_start), repeats=repeats)


def interval_text(lo: float | None, hi: float | None) -> str:
    """`` (lo-hi)``, the interval after a pooled PSNR in a table; nothing where there is none or where every
    draw matched exactly (the PSNR says inf)."""
    if lo is None or hi is None or math.isinf(lo) or math.isnan(lo):
        return ""
    return f" ({lo:.2f}-{'inf' if math.isinf(hi) else format(hi, '.2f')})"


def _num(x, fmt: str) -> str:
    if x is None:
        return "-"
    return "inf" if isinstance(x, float) and math.isinf(x) else format(x, fmt)


def _meter_cells(scores: dict, names: list[str]) -> str:
    return "".join(f" {_num(scores.get(n), '.1f' if n == 'frechet' else '.3f')} |" for n in names)


def _plan_row(label: str, section: dict, names: list[str]) -> str:
    """A plan's row of the eval table."""
    lo, hi = section["plan_range_s"]
    slo, shi = section["speedup_range"]
    return (f"| {label} ({section['plan_strategy']}) | {section['plan_s']:.3f} ({lo:.3f}-{hi:.3f}) | "
            f"{section['speedup']:.2f}x ({slo:.2f}-{shi:.2f}) | "
            f"{_num(section['psnr'], '.2f')}{interval_text(section.get('psnr_lo'), section.get('psnr_hi'))} | "
            + " | ".join(_num(section[k], ".2f") for k in ("psnr_mean", "psnr_p5", "psnr_worst"))
            + f" | {_num(section['ssim'], '.4f')} | {_num(section['rel_l1'], '.4f')} |"
            + _meter_cells(section.get("meter") or {}, names))


def _comparison_text(comparison: dict) -> str:
    """The sentence under the table that says which plan the paired difference favours, if either."""
    lo, hi = comparison["interval"]
    verdict = ("the plan is better on inputs like these" if lo > 0 else
               "the other plan is better on inputs like these" if hi < 0 else
               "these inputs do not tell the two apart")
    return (f" The plan's pooled PSNR is {comparison['difference']:+.2f} dB against the other plan's "
            f"({comparison['level']:.0%} paired bootstrap interval {lo:+.2f} to {hi:+.2f} dB): {verdict}.")


def eval_markdown(report: dict) -> str:
    """A markdown table of an :func:`evaluate_plan` report: full compute vs the plan (and the plan it was
    compared against, with the paired difference under the table)."""
    meter = report.get("meter") or {"full": {}, "plan": {}}
    names = list(meter["full"])
    head = ("| run | time s (median, min-max) | speedup (min-max) | PSNR dB pooled | mean | p5 | worst | SSIM | rel. L1 |"
            + "".join(f" {METER_LABELS.get(n, n)} |" for n in names))
    sep = "|---" * (9 + len(names)) + "|"
    lo, hi = report["full_range_s"]
    rows = [f"| full compute | {report['full_s']:.3f} ({lo:.3f}-{hi:.3f}) | 1.00x |" + " |" * 6
            + _meter_cells(meter["full"], names),
            _plan_row("plan", {**report, "meter": meter["plan"]}, names)]
    if "against" in report:
        rows.append(_plan_row("against", report["against"], names))
    note = (f"\n\n{report['n']} held-out seeds {report['seeds']}, {report['repeats']} interleaved timed runs per side "
            "after a warm-up; speedup = median of per-run ratios. PSNR pooled: from the MSE over all images, in "
            f"brackets the {PSNR_INTERVAL_LEVEL:.0%} bootstrap interval over the images (how far another "
            f"{report['n']} inputs could move it); mean, p5, worst: of the per-image PSNRs.")
    if "comparison" in report:
        note += _comparison_text(report["comparison"])
    noise = report.get("timing_noise")
    if noise:
        note += (f" The speedup is uncertain by about {noise['speedup_se']:.1%} (standard error from the scatter of "
                 "the per-run ratios)" + (": noisy timing (--max-repeats adds rounds while it is; a machine with "
                                          "nothing else running narrows it)." if noise["noisy"] else "."))
    return "\n".join([head, sep, *rows]) + note
