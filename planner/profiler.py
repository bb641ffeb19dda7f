"""Compatibility name for :mod:`planner.profile` (the profiler lives in that package)."""

from planner.profile import *  # noqa: F401,F403
from planner.profile import __all__  # noqa: F401
