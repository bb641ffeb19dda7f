"""Search strategies: one small interface, many implementations found by name.

A strategy is a class with a ``name`` and ``search(context, budget) -> Plan``. It lives in
its own module in this package and registers itself with ``@register``; ``get_strategy(name)``
imports the package's modules on first use, so adding a strategy is adding one file.
"""

from __future__ import annotations

import abc
import importlib
import pkgutil
from typing import Any, ClassVar

from planner.errors import PlannerError

_REGISTRY: dict[str, type["Strategy"]] = {}
_NOT_STRATEGIES = {"budget", "context"}
# What `planner search` passes to every strategy as params beside ``--param`` (``--seed 3`` -> ``seed=3``).
RUN_OPTIONS = ("seed", "n_trials", "storage", "study", "resume")


class Strategy(abc.ABC):
    """Turns a search context and a budget into a Plan. Parameters go to ``__init__`` as keywords."""

    name: ClassVar[str]

    def __init__(self, **params: Any):
        self.params = params

    @abc.abstractmethod
    def search(self, context, budget):
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
