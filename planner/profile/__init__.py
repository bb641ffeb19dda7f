"""Profiling: how stable each cacheable module is across steps and CFG branches, what it costs, and
a latency model that predicts the run time of any cache plan.

Public API: :func:`profile_model`, :func:`load_profile`, :class:`Profile`, :class:`ProfileMeta`,
:class:`LatencyModel`, :class:`ProfileError`, :class:`TimingConfig`. Submodules: ``capture``
(hooks), ``similarity`` (the streamed similarity pass), ``timing`` (the cost pass), ``latency``,
``artifact`` (files and integrity), ``report`` (text summary and plots).
"""

from planner.profile.artifact import (
    SCHEMA_VERSION,
    ModuleInfo,
    Profile,
    ProfileError,
    ProfileMeta,
    default_profile_name,
    load_profile,
)
from planner.profile.core import profile_model
from planner.profile.latency import LatencyModel, ModuleCost
from planner.profile.similarity import CFG_LAG
from planner.profile.timing import TimingConfig

__all__ = [
    "CFG_LAG",
    "LatencyModel",
    "ModuleCost",
    "ModuleInfo",
    "Profile",
    "ProfileError",
    "ProfileMeta",
    "SCHEMA_VERSION",
    "TimingConfig",
    "default_profile_name",
    "load_profile",
    "profile_model",
]
