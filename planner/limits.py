"""What a user may ask for: the bounds every input is checked against before anything is allocated,
and the ``argparse`` types that apply them to command-line flags.

The bounds are far above any real use (a sampler of 10,000 steps, 100,000 seeds) and far below what
takes a machine down; a value outside them is refused in one line, never turned into a huge list.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

MAX_STEPS = 10_000  # sampling steps of a run, a plan or a profile
MAX_SEEDS = 100_000  # seeds (inputs) of one evaluation or sampling run
MAX_SEED = 2**63 - 1  # a seed is a non-negative 64-bit integer
MAX_COUNT = 100_000  # samples, calibration inputs, trials, lags, ...
MAX_REPEATS = 1_000  # timed or warm-up rounds


def check_finite(value: float, name: str) -> float:
    """``value`` as a float; ValueError naming ``name`` when it is NaN or infinite."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number (``nan``, ``inf`` and non-numbers are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_in(low: int, high: int) -> Callable[[str], int]:
    """argparse type: an integer in ``[low, high]``."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer from {low} to {high}, got {text.strip()[:30]}")
        return value

    parse.__name__ = "int"
    return parse


steps_arg = int_in(1, MAX_STEPS)
seed_arg = int_in(0, MAX_SEED)
count_arg = int_in(0, MAX_COUNT)  # checked for its own lower bound (>= 1 where needed) by the command
repeats_arg = int_in(0, MAX_REPEATS)
