"""The transformer's whole output as a plan action (``Plan.output``): served from a cache, the transformer not run.

At a step whose output code is not ``C`` the step tracker returns what :class:`OutputCache` serves, and
nothing of the transformer runs (no embedding, no block, no final layer): ``R`` is its last computed
output, ``F``, ``Q`` and ``L`` the executor's forecast (:func:`planner.executor.hooks.forecast`) through
its last computed outputs. A call's output is kept under the CFG branches the call carries (a batched
call holds both halves and is forecast whole, per sample; with separate calls each branch keeps its
own) and, in a pipeline of several transformers (Wan 2.2), under the transformer that computed it, so a
forecast never mixes branches or networks. As for a module, a forecast from fewer outputs than its
order needs takes the order they allow, and with nothing kept the transformer runs.

Only the output's tensor is forecast; the container the transformer returned (a tuple or a diffusers
``BaseOutput``) is rebuilt around it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from planner.errors import PlannerError
from planner.executor import tree
from planner.executor.hooks import action_taken, from_outputs
from planner.plan import COMPUTE, FORECAST_ORDER

if TYPE_CHECKING:
    from planner.executor.engine import Engine

NOT_RUN = ord("-")
CallKind = tuple[str | None, tuple[str, ...]]  # (the transformer of a multi-transformer pipeline, the branches)


class OutputCache:
    """Per call kind (the transformer and the branches it carries), the last computed outputs, and what each
    step did."""

    def __init__(self, codes: str):
        self.codes = codes
        self.keep = 1 + max(FORECAST_ORDER.get(c, 0) for c in codes)
        self.kept: dict[CallKind, list[tuple[int, torch.Tensor]]] = {}
        self.containers: dict[CallKind, Any] = {}  # the last computed output as returned, per call kind
        self.log = bytearray([NOT_RUN] * len(codes))  # the action each step of the current run took

    def serve(self, engine: "Engine", step: int, kind: CallKind) -> Any:
        """The output to return instead of running the transformer at ``step``, or ``None``: run it."""
        kept = self.kept.get(kind, [])
        code = action_taken(self.codes[step], len(kept))
        if code == COMPUTE:
            return None
        self.log[step] = ord(code)
        return _with_sample(self.containers[kind], from_outputs(engine, kept, code, step))

    def store(self, step: int, kind: CallKind, output: Any) -> None:
        """Keep the output the transformer computed at ``step`` (a step run again replaces itself)."""
        sample = tree.first_tensor(output)
        if sample is None:
            return
        older = [p for p in self.kept.get(kind, []) if p[0] != step]
        self.kept[kind] = (older + [(step, sample)])[-self.keep:]
        self.containers[kind] = output
        self.log[step] = ord(COMPUTE)

    def executed(self, steps: list[int]) -> str:
        """What the output did at ``steps`` of the current run (``-``: the step did not run)."""
        return "".join(chr(self.log[k]) for k in steps)

    def clear(self) -> None:
        """Forget the run: kept outputs and the log."""
        self.kept.clear()
        self.containers.clear()
        self.log = bytearray([NOT_RUN] * len(self.codes))


def served_positions(executed: str | None) -> set[int]:
    """The positions in ``executed`` (what :meth:`OutputCache.executed` gave) of the steps whose output was served."""
    return {i for i, c in enumerate(executed or "") if c not in (chr(NOT_RUN), COMPUTE)}


def _with_sample(container: Any, sample: torch.Tensor) -> Any:
    """``container`` (what the transformer returned) with its first tensor replaced by ``sample``."""
    if isinstance(container, torch.Tensor):
        return sample
    if isinstance(container, (tuple, list)):
        return type(container)([sample, *container[1:]])
    if isinstance(container, dict):  # diffusers' BaseOutput: a dataclass that is also an ordered dict
        first = next(iter(container))
        return type(container)(**{**container, first: sample})
    raise PlannerError(f"cannot serve a transformer output of type {type(container).__name__}")
