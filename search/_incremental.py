"""Greedy's incremental trials: a trial re-runs only the blocks from the tried module's block onward.

Within one step (one transformer call) greedy tries one module at a time, in forward order, with the
decisions before it fixed. The blocks before the tried module's block then see exactly the inputs
they saw in the last forward whose decisions they share (the step's reference, or the last trial that
was accepted): their outputs are the same. :class:`StepReplay` keeps each block's output of that
forward (the *incumbent*) and, in a trial, hands it back for the earlier blocks instead of running
them; the tried block and everything after it run through the executor as usual. The embedding layers
before the first block and the output layers after the last still run in every trial (cheap next to
the blocks).

What stays the same: every action still runs through the executor's hooks (this only skips blocks
whose output is already known, before the executor's hook on them is reached), the caches are rewound
after each trial exactly as before, and the step's final forward (the one whose caches the next steps
use) runs every block. A trial's output is the full forward's, bit for bit on a deterministic device:
tests/test_search_cost.py compares incremental with full trials on every error and decision.

Why it holds: a block's output depends on its inputs, its weights and the executor's cache state of
the modules inside it; within a step the earlier blocks' decisions and cache states are the same in the
incumbent forward and in the trial (the trial changes one later module; the caches are restored
between trials), and the embeddings are recomputed from the same call arguments. Stored outputs are
never written in place (the executor's snapshots rely on the same fact).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook

REPLAY_HOOK = "planner_greedy_replay"


class _ReplayHook(ModelHook):
    """Outermost hook on one block: serve the incumbent's output in a trial that starts later, else run
    (through the executor's hook below it) and keep what it returned."""

    def __init__(self, replay: "StepReplay", name: str, position: int):
        super().__init__()
        self.replay = replay
        self.name = name
        self.position = position

    def new_forward(self, module, *args, **kwargs):
        r = self.replay
        if r.start is None:  # not inside a trial or a reference forward: a plain call
            return self.fn_ref.original_forward(*args, **kwargs)
        if self.position < r.start and self.name in r.incumbent:
            if r.cost is not None:
                r.cost.skip()
            return r.incumbent[self.name]
        out = self.fn_ref.original_forward(*args, **kwargs)
        r.fresh[self.name] = out
        return out


class StepReplay:
    """The incumbent block outputs of the current step (one transformer call) and the hooks that replay them.

    Use: :meth:`reference` for the step's first forward (runs every block, becomes the incumbent),
    :meth:`trial` for each trial (blocks before ``start`` replayed), :meth:`adopt` when the last trial
    is accepted (its outputs become the incumbent's), :meth:`remove` at the end."""

    def __init__(self, transformer: torch.nn.Module, modules, cost=None):
        self.cost = cost
        self.start: int | None = None
        self.incumbent: dict[str, Any] = {}
        self.fresh: dict[str, Any] = {}
        self._last: dict[str, Any] | None = None
        blocks = [m for m in modules if m.kind == "block"]
        # the position of each module's block in forward order (sub-layers: their enclosing block's)
        self.position = {m.name: m.block for m in modules}
        named = dict(transformer.named_modules())
        self._registries: list[HookRegistry] = []
        try:
            for m in blocks:
                registry = HookRegistry.check_if_exists_or_initialize(named[m.name])
                registry.register_hook(_ReplayHook(self, m.name, m.block), REPLAY_HOOK)
                self._registries.append(registry)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Take the replay hooks off (the executor's hooks below them stay)."""
        for registry in self._registries:
            registry.remove_hook(REPLAY_HOOK, recurse=False)
        self._registries.clear()
        self.incumbent, self.fresh, self._last = {}, {}, None

    def _forward(self, start: int, forward: Callable[[], Any]) -> Any:
        self.start, self.fresh = start, {}
        try:
            return forward()
        finally:
            self.start = None

    def reference(self, forward: Callable[[], Any]) -> Any:
        """Run the step's first forward in full; its block outputs become the incumbent."""
        out = self._forward(0, forward)
        self.incumbent, self._last = self.fresh, None
        self.fresh = {}
        return out

    def trial(self, module: str, forward: Callable[[], Any]) -> Any:
        """Run a trial of ``module``: the blocks before its block replay the incumbent's outputs."""
        out = self._forward(self.position[module], forward)
        self._last, self.fresh = self.fresh, {}
        return out

    def adopt(self) -> None:
        """The last trial was accepted: its forward is the new incumbent (earlier blocks unchanged)."""
        if self._last is not None:
            self.incumbent = {**self.incumbent, **self._last}
        self._last = None

    def discard(self) -> None:
        """The last trial was rejected: the incumbent stays."""
        self._last = None
