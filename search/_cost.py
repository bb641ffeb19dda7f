"""What a search costs: transformer calls, block calls, and wall time (issue 19, part 3).

:class:`SearchCost` counts through plain ``torch`` forward pre-hooks on the transformer's blocks, so it
sees every call whatever runs it (the executor, a strategy's trials, a training loop) and changes no
computation. A transformer call is a call of its first block (every forward runs its blocks in order,
the first one first). A block call that a strategy serves from activations it kept instead of running
the block (greedy's incremental trials, :mod:`planner.search._incremental`) is reported to the meter
with :meth:`SearchCost.skip` and not counted as computed.

Figures, as :meth:`SearchCost.to_dict` gives them:

* ``transformer_calls``: forward calls of the transformer (whole or partly replayed);
* ``block_calls``: block forwards that ran through the executor (computed, or served by the executor's
  own cache actions: counted as computed, so the figure is an upper bound of the block compute);
* ``runs_by_calls`` = ``transformer_calls`` / the calls of one sampling run of the calibration batch
  (steps x calls per step), and ``runs`` = ``block_calls`` / (blocks x those calls): the cost in full
  sampling runs, the second one counting a partly replayed call by the blocks it ran;
* ``wall_s``: the wall time from start to stop.

The calibration reference run that every search context makes first (one full run) is not included:
``reference_runs`` says so.
"""

from __future__ import annotations

import time
from typing import Any

import torch


class SearchCost:
    """A meter of model calls and time, on while :meth:`start` .. :meth:`stop` (or a ``with`` block)."""

    def __init__(self, transformer: torch.nn.Module, block_names: list[str], calls_per_run: int):
        self.transformer = transformer
        self.block_names = list(block_names)
        self.calls_per_run = max(1, int(calls_per_run))
        self.transformer_calls = 0
        self.block_visits = 0  # every call of a block, replayed or not
        self.skipped = 0  # block calls served from kept activations (not run)
        self.wall_s = 0.0
        self._handles: list[Any] = []
        self._t0: float | None = None

    # ------------------------------------------------------------------ on / off
    def start(self) -> "SearchCost":
        """Install the counters and start the clock (idempotent while running)."""
        if self._handles:
            return self
        modules = dict(self.transformer.named_modules())
        for i, name in enumerate(self.block_names):
            block = modules.get(name)
            if block is not None:
                self._handles.append(block.register_forward_pre_hook(self._counter(first=i == 0)))
        self._t0 = time.perf_counter()
        return self

    def stop(self) -> "SearchCost":
        """Take the counters off and stop the clock (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._t0 is not None:
            self.wall_s += time.perf_counter() - self._t0
            self._t0 = None
        return self

    def __enter__(self) -> "SearchCost":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _counter(self, first: bool):
        def count(module, args):
            self.block_visits += 1
            if first:
                self.transformer_calls += 1

        return count

    # ------------------------------------------------------------------ figures
    def skip(self, n: int = 1) -> None:
        """``n`` block calls were served from kept activations instead of running."""
        self.skipped += n

    @property
    def block_calls(self) -> int:
        """Block forwards that ran (through the executor)."""
        return self.block_visits - self.skipped

    @property
    def runs(self) -> float:
        """Block calls that ran, in full sampling runs of the calibration batch."""
        per_run = self.calls_per_run * max(1, len(self.block_names))
        return self.block_calls / per_run

    def to_dict(self) -> dict:
        """The figures (see the module docstring), JSON-ready."""
        wall = self.wall_s + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)
        return {
            "transformer_calls": self.transformer_calls,
            "block_calls": self.block_calls,
            "blocks_replayed": self.skipped,
            "calls_per_run": self.calls_per_run,
            "blocks": len(self.block_names),
            "runs_by_calls": round(self.transformer_calls / self.calls_per_run, 3),
            "runs": round(self.runs, 3),
            "wall_s": round(wall, 3),
            "reference_runs": 1,
        }


def cost_meter(context) -> SearchCost:
    """A meter for a search context's transformer and sampler (not started)."""
    blocks = [m.name for m in context.modules if m.kind == "block"]
    return SearchCost(context.runner.transformer, blocks, context.steps * context.layout.calls_per_step)


def active_cost(context) -> SearchCost | None:
    """The meter running on ``context`` (set by the search entry point), or None."""
    return getattr(context, "cost", None)
