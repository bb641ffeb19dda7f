"""Search strategies: one small interface, many implementations found by name.

A strategy is a class with a ``name``, a ``summary``, a declared ``Settings`` model
(:mod:`planner.search.settings`) and ``search(context, budget) -> Plan``. It lives in its own
module of this package and registers itself with ``@register``; :func:`get_strategy` imports the
package's modules on first use, so adding a strategy is adding one file. :func:`search_plan` is
the one-line entry point.
"""

from __future__ import annotations

import abc
import importlib
import pkgutil
from typing import TYPE_CHECKING, Any, ClassVar

from planner.errors import PlannerError
from planner.search.settings import RUN_OPTIONS, StrategySettings, parse_settings

if TYPE_CHECKING:
    from planner.plan import Plan
    from planner.search.budget import Budget
    from planner.search.context import SearchContext

_REGISTRY: dict[str, type["Strategy"]] = {}
_NOT_STRATEGIES = {"api", "budget", "context", "settings"}


class Strategy(abc.ABC):
    """Turns a search context and a budget into a Plan.

    Construct with keyword settings (``Greedy(max_run=2)``) or a ready ``Settings`` object; bad
    settings raise PlannerError before anything runs."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Settings: ClassVar[type[StrategySettings]] = StrategySettings

    def __init__(self, settings: StrategySettings | None = None, /, **params: Any):
        if settings is not None and params:
            raise TypeError("give a Settings object or keyword settings, not both")
        self.settings = settings if settings is not None else parse_settings(self.Settings, params, self.name)

    def prepare(self) -> None:
        """Open what the search needs besides the model (a study's storage), before any model loads, so
        that a wrong address fails in seconds rather than after profiling. Nothing by default."""

    @abc.abstractmethod
    def search(self, context: "SearchContext", budget: "Budget") -> "Plan":
        """Return a Plan meeting ``budget`` on ``context``, or raise PlannerError saying why none does."""


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy findable by its ``name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"two strategies named {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _NOT_STRATEGIES and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def strategy_names() -> list[str]:
    """Names of all registered strategies, sorted."""
    _discover()
    return sorted(_REGISTRY)


def get_strategy(name: str) -> type[Strategy]:
    """The strategy class registered as ``name``; PlannerError listing the choices otherwise."""
    _discover()
    if name not in _REGISTRY:
        raise PlannerError(f"unknown strategy {name!r}: choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def make_strategy(name: str, params: dict[str, Any] | None = None) -> Strategy:
    """The strategy ``name`` with its settings parsed from ``params`` (PlannerError on any bad one)."""
    return get_strategy(name)(**(params or {}))


def __getattr__(name: str):
    if name == "search_plan":  # lazily: the entry point pulls in the runner and the profiler
        from planner.search.api import search_plan

        return search_plan
    raise AttributeError(f"module 'planner.search' has no attribute {name!r}")


__all__ = ["RUN_OPTIONS", "Strategy", "StrategySettings", "get_strategy", "make_strategy", "register",
           "search_plan", "strategy_names"]
