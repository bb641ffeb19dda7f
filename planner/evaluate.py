"""What a plan really gives on held-out seeds: wall-clock speedup and quality against full compute.

Seeds: calibration uses seeds below ``EVAL_SEED_BASE``, evaluation seeds from it on, so a plan is
never judged on the inputs it was searched on. Timing interleaves the runs (A B A B ...) after a
warm-up and takes medians, so drifting machine load hits both sides alike.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from planner.errors import PlannerError

CALIB_SEED_BASE = 0
EVAL_SEED_BASE = 1_000_000


def calibration_seeds(n: int) -> list[int]:
    """The ``n`` calibration seeds."""
    return list(range(CALIB_SEED_BASE, CALIB_SEED_BASE + n))


def evaluation_seeds(n: int, start: int = EVAL_SEED_BASE) -> list[int]:
    """``n`` held-out seeds from ``start`` (which must lie in the evaluation range)."""
    if start < EVAL_SEED_BASE:
        raise PlannerError(f"evaluation seeds start at {EVAL_SEED_BASE}, got {start}")
    return list(range(start, start + n))


def time_interleaved(runs: dict[str, Callable[[], object]], repeats: int = 3, warmup: int = 1,
                     device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Seconds of each run, ``repeats`` times, interleaved in the order given, after ``warmup`` rounds."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(warmup + repeats):
        for name, fn in runs.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def verify_plan(runner, sampler, plan, samples: int = 8, repeats: int = 3, seed_start: int = EVAL_SEED_BASE) -> dict:
    """Realized speedup (median of interleaved runs, with min-max spread) and PSNR/SSIM/relative L1
    of ``plan`` against full compute on ``samples`` held-out seeds."""
    from planner.executor import apply_plan
    from planner.metrics import compare

    seeds = evaluation_seeds(samples, seed_start)
    if set(seeds) & set(plan.provenance.calib_seeds):
        raise PlannerError("evaluation seeds overlap the plan's calibration seeds")
    conditions = runner.conditions(samples, seed=seed_start)
    outputs: dict[str, torch.Tensor] = {}

    def full():
        outputs["full"] = runner.run(conditions, seeds, sampler)

    def planned():
        with apply_plan(runner.pipe, plan):
            outputs["plan"] = runner.run(conditions, seeds, sampler)

    times = time_interleaved({"full": full, "plan": planned}, repeats=repeats, device=runner.device)
    full_s, plan_s = statistics.median(times["full"]), statistics.median(times["plan"])
    return {
        "seeds": [seeds[0], seeds[-1]],
        "full_s": full_s,
        "plan_s": plan_s,
        "speedup": full_s / plan_s,
        "speedup_range": [min(times["full"]) / max(times["plan"]), max(times["full"]) / min(times["plan"])],
        **compare(outputs["plan"], outputs["full"]),
    }
