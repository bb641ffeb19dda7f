"""Greedy's incremental trials: a trial re-runs only the blocks from the tried module's block onward.

Within one step (one transformer call) greedy tries one module at a time, in forward order, with the
decisions before it fixed. The blocks before the tried module's block then see exactly the inputs
they saw in the last forward whose decisions they share (the step's reference, or the last trial that
was accepted): their outputs are the same. :class:`StepReplay` keeps each block's output of that
forward (the *incumbent*) and, in a trial, hands it back for the earlier blocks instead of running
them; the tried block and everything after it run through the executor as usual. The embedding layers
before the first block and the output layers after the last still run in every trial (cheap next to
the blocks).

The step's final forward (the one the trajectory and the next steps' caches come from) is not run
again either: its decisions are the incumbent's, so its output is the incumbent forward's output, and
each module's cache state after it is the state that module had right after the last forward that ran
it (the reference, or the accepted trial that last ran its block): :meth:`StepReplay.finish` restores
those states, kept from each forward with the session's own ``snapshot``. So a step costs one full
forward (the reference) plus, per trial, the blocks from the tried one onward.

What stays the same: every action still runs through the executor's hooks (this only skips blocks
whose output is already known, before the executor's hook on them is reached), and the caches are
rewound after each trial exactly as before. A trial's output is the full forward's, bit for bit on a
deterministic device: tests/test_search_cost.py compares incremental with full trials on every error,
decision and final latent.

Why it holds: a block's output depends on its inputs, its weights and the executor's cache state of
the modules inside it; within a step the earlier blocks' decisions and cache states are the same in the
incumbent forward and in the trial (the trial changes one later module; the caches are restored
between trials), and the embeddings are recomputed from the same call arguments. The last forward that
ran a block had the final decisions for that block and every block before it (a later acceptance of an
earlier-or-equal block would have run it again), so the block's input, action and cache writes there
are the final forward's. Stored outputs are never written in place (the executor's snapshots rely on
the same fact).
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
    :meth:`trial` for each trial (blocks before the tried module's block replayed), then :meth:`adopt`
    when that trial is accepted (it becomes the incumbent) or :meth:`discard`; :meth:`finish` ends the
    step in the incumbent's state; :meth:`remove` at the end of the pass. ``session``: the editable
    :class:`~planner.executor.session.ExecutionSession` the trials run through."""

    def __init__(self, transformer: torch.nn.Module, modules, session, cost=None):
        self.cost = cost
        self.session = session
        self.start: int | None = None
        self.incumbent: dict[str, Any] = {}  # block -> output in the incumbent forward
        self.fresh: dict[str, Any] = {}
        self._last: tuple | None = None  # the last trial's (block outputs, cache states, output)
        self._states: dict[str, Any] = {}  # module -> cache state right after the incumbent's forward ran it
        self._output: Any = None  # the incumbent forward's output
        self._stale = False  # a choice was accepted without its trial running here: finish() runs the step
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
        self.incumbent, self.fresh, self._last, self._states, self._output = {}, {}, None, {}, None

    def _forward(self, start: int, forward: Callable[[], Any]) -> Any:
        self.start, self.fresh = start, {}
        try:
            return forward()
        finally:
            self.start = None

    def _ran_from(self, start: int) -> dict[str, Any]:
        """The cache states, right now, of the modules whose block is at ``start`` or later (those that ran)."""
        return {name: state for name, state in self.session.snapshot().items()
                if self.position.get(name, start) >= start}

    def reference(self, forward: Callable[[], Any]) -> Any:
        """Run the step's first forward in full; it becomes the incumbent."""
        out = self._forward(0, forward)
        self.incumbent, self.fresh = self.fresh, {}
        self._states, self._output = self._ran_from(0), out
        self._last, self._stale = None, False
        return out

    def trial(self, module: str, forward: Callable[[], Any]) -> Any:
        """Run a trial of ``module``: the blocks before its block replay the incumbent's outputs. Call it
        before the caches are rewound (it keeps the states the trial left)."""
        start = self.position[module]
        out = self._forward(start, forward)
        self._last, self.fresh = (self.fresh, self._ran_from(start), out), {}
        return out

    def adopt(self) -> None:
        """The last trial was accepted: its forward is the new incumbent (earlier blocks unchanged)."""
        if self._last is None:  # accepted without a trial run here (e.g. errors given from elsewhere)
            self._stale = True
            return
        outputs, states, out = self._last
        self.incumbent = {**self.incumbent, **outputs}
        self._states = {**self._states, **states}
        self._output = out
        self._last = None

    def discard(self) -> None:
        """The last trial was rejected: the incumbent stays."""
        self._last = None

    def finish(self, forward: Callable[[], Any]) -> Any:
        """End the step with the decisions taken: put every module's caches in the state the final forward
        would leave and return its output (the incumbent's). Runs ``forward`` instead when a choice was
        accepted without its trial running here."""
        if self._stale or self._output is None:
            return forward()
        self.session.restore(self._states)
        out, self._output, self._states, self.incumbent = self._output, None, {}, {}
        return out
