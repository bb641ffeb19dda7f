"""Seeds: calibration inputs and held-out evaluation inputs come from disjoint ranges.

Calibration (profiling, search) uses seeds from ``CALIB_SEED_BASE`` up, evaluation seeds from
``EVAL_SEED_BASE`` on, so a plan is never judged on the inputs it was searched on
(:func:`check_held_out` refuses overlaps unless forced).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from planner.errors import PlannerError
from planner.limits import MAX_SEED, MAX_SEEDS

CALIB_SEED_BASE = 0
EVAL_SEED_BASE = 1_000_000


def calibration_seeds(n: int) -> list[int]:
    """The ``n`` calibration seeds."""
    return list(range(CALIB_SEED_BASE, CALIB_SEED_BASE + n))


def evaluation_seeds(n: int, start: int = EVAL_SEED_BASE) -> list[int]:
    """``n`` held-out seeds from ``start`` (which must lie in the evaluation range)."""
    if start < EVAL_SEED_BASE:
        raise PlannerError(f"evaluation seeds start at {EVAL_SEED_BASE}, got {start}")
    if not 0 <= n <= MAX_SEEDS or start + n - 1 > MAX_SEED:
        raise PlannerError(f"{n} evaluation seeds from {start}: at most {MAX_SEEDS} seeds, each below 2**63")
    return list(range(start, start + n))


def parse_seeds(text: str) -> list[int]:
    """``"100..131"`` (inclusive), ``"7"``, or a comma list of both (``"1,5..7"``) -> sorted distinct seeds.

    Sizes are checked before any list is built: at most ``MAX_SEEDS`` seeds, each below 2**63."""
    parts = [p for p in str(text).replace(" ", "").split(",")]
    ranges: list[tuple[int, int]] = []
    for part in parts:
        if len(part) > 40:
            raise PlannerError(f"cannot read seeds {part[:40]!r}...: a seed is an integer below 2**63")
        if m := re.fullmatch(r"(\d+)\.\.(\d+)", part):
            lo, hi = int(m.group(1)), int(m.group(2))
        elif re.fullmatch(r"\d+", part):
            lo = hi = int(part)
        else:
            raise PlannerError(f"cannot read seeds {text!r}: write a range such as 100..131, a seed, or a comma list")
        if hi < lo:
            raise PlannerError(f"seed range {part!r} runs backwards")
        if hi > MAX_SEED:
            raise PlannerError(f"seed {hi} is too large: seeds are integers below 2**63")
        if hi - lo + 1 > MAX_SEEDS:
            raise PlannerError(f"seed range {part!r} holds {hi - lo + 1} seeds, more than {MAX_SEEDS} (the most one run takes)")
        ranges.append((lo, hi))
    if sum(hi - lo + 1 for lo, hi in ranges) > MAX_SEEDS:
        raise PlannerError(f"seeds {text[:60]!r} number more than {MAX_SEEDS} (the most one run takes)")
    seeds: set[int] = set()
    for lo, hi in ranges:
        seeds.update(range(lo, hi + 1))
    return sorted(seeds)


def format_seeds(seeds: Iterable[int]) -> str:
    """The inverse of :func:`parse_seeds`: ``[1, 2, 3, 7]`` -> ``"1..3,7"``."""
    seeds = sorted({int(s) for s in seeds})
    parts, i = [], 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if i == j else f"{seeds[i]}..{seeds[j]}")
        i = j + 1
    return ",".join(parts)


def check_held_out(seeds: Iterable[int], calib_seeds: Iterable[int], force: bool = False) -> None:
    """PlannerError when ``seeds`` share any seed with the plan's calibration seeds (unless ``force``)."""
    overlap = sorted(set(seeds) & set(calib_seeds))
    if overlap and not force:
        raise PlannerError(
            f"evaluation seeds overlap the plan's calibration seeds ({format_seeds(overlap)}): a plan must be judged "
            f"on held-out seeds (default from {EVAL_SEED_BASE}); --force evaluates anyway"
        )
