"""The two diffusers hooks of the executor.

* :class:`StepTrackerHook`, on the transformer: tells the engine when a call starts and ends, with
  its timestep and (for separate CFG calls) the diffusers cache-context name, and serves the whole
  output instead of running the transformer at the steps where the plan's ``output`` says so. It holds
  a ``StateManager`` only so that ``transformer.cache_context("cond")`` reaches it.
* :class:`CacheHook`, on each cacheable module whose decisions are not all ``compute`` (or that is
  gated): runs the module or serves it from its per-branch cache, as the plan says for the
  current step and branch. This is the one implementation of the caching semantics.

Both replace ``forward`` through ``ModelHook.new_forward`` on the instance's ``HookRegistry``;
nothing is patched on a class. Their Python bodies are kept out of ``torch.compile`` graphs
(``torch.compiler.disable(recursive=False)``): the decision logic runs eagerly while the module
computation they call is still compiled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks.hooks import BaseState, ModelHook, StateManager

from planner.cfg import BRANCHES, other_branch
from planner.executor import tree
from planner.executor.shapes import call_shapes, check_share, tree_shapes
from planner.modules import module_kind
from planner.plan import COMPUTE, FORECAST_ORDER

if TYPE_CHECKING:
    from planner.executor.engine import Engine

# forecast2_limited (L): a second-order term larger than this multiple of the first-order term (per sample)
# is scaled down to it. A Taylor series whose second term outgrows its first is extrapolating noise in three
# points rather than a curve, and on a few samples that overshoot grows into a diverged image.
FORECAST2_LIMIT = 1.0

TRACKER_HOOK = "dit_cache_plan.tracker"
MODULE_HOOK = "dit_cache_plan.module"


class _ContextOnly(BaseState):
    """Nothing: the tracker's StateManager is only read for the diffusers cache-context name."""

    def reset(self, *args, **kwargs) -> None:
        pass


def _eager(fn):
    # Hook bodies mutate Python state per call (step counters, caches): tracing them would guard on
    # those values and recompile every step. recursive=False keeps the module's own forward, which
    # they call, compiled.
    try:
        return torch.compiler.disable(fn, recursive=False)
    except TypeError:  # older torch without the recursive flag
        return torch.compiler.disable(fn)


_python = torch.compiler.disable  # bookkeeping that calls no module: never traced at all


class StepTrackerHook(ModelHook):
    """Top-level hook: feeds each transformer call's timestep and context to the engine."""

    _is_stateful = True

    def __init__(self, engine: "Engine"):
        super().__init__()
        self.engine = engine
        self.context = StateManager(_ContextOnly)  # diffusers' cache_context() sets its context

    def context_name(self) -> str | None:
        ctx = self.context._context  # None outside a cache_context block (DiT, PixArt, SD3 never open one)
        return None if ctx is None else ctx.name

    @_eager
    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        try:
            self.engine.begin_call(module, args, kwargs, self.context_name())
            output = self.engine.served_output()  # the plan's output action: no transformer run at this step
            if output is None:
                output = self.fn_ref.original_forward(*args, **kwargs)
                self.engine.keep_output(output)
        except BaseException:
            self.engine.abort_call()
            raise
        self.engine.end_call()
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.engine.reset()
        return module


def lagrange_weights(xs: list[float], at: float) -> list[float]:
    """The weights ``w_i`` with ``sum_i w_i f(xs[i])`` = the polynomial through the points, at ``at``."""
    out = []
    for i, xi in enumerate(xs):
        w = 1.0
        for j, xj in enumerate(xs):
            if j != i:
                w *= (at - xj) / (xi - xj)
        out.append(w)
    return out


def limited_forecast2(outputs: tuple[torch.Tensor, ...], weights: list[float], scale: float, limit: float) -> torch.Tensor:
    """The second-order forecast ``sum(w * o)`` of the three ``outputs`` (oldest first), with its
    second-order term (what it adds to the first-order forecast ``o2 + (o2 - o1) * scale``) scaled down,
    per sample (leading dimension), to at most ``limit`` times the first-order term's norm."""
    o2 = outputs[-1]
    first = (o2 - outputs[-2]) * scale
    second = sum(w * o for w, o in zip(weights, outputs)) - o2 - first
    cut = (limit * _sample_norms(first) / _sample_norms(second).clamp_min(torch.finfo(torch.float32).tiny)).clamp(max=1.0)
    return o2 + first + second * cut.to(second.dtype)


def action_taken(code: str, kept: int) -> str:
    """The action really taken for ``code`` with ``kept`` computed outputs in the cache: with none it
    computes; a forecast from fewer outputs than its order needs takes the highest order they allow (one
    output: reuse)."""
    if code == COMPUTE or kept == 0:
        return COMPUTE
    if code in FORECAST_ORDER and kept <= FORECAST_ORDER[code]:
        return {1: "R", 2: "F"}[kept]
    return code


@_python
def forecast(engine: "Engine", points: list[tuple[int, Any]], step: int, limited: bool = False) -> Any:
    """The polynomial through ``points`` (``(step, output)``, oldest first) at ``step``, in the sampler's time
    (``engine.time_of``); ``limited``: its second-order term cut to :data:`FORECAST2_LIMIT` times the
    first-order one. Every forecast of the executor, of a module's output or of the transformer's, is this."""
    at, xs = engine.time_of(step), [engine.time_of(m) for m, _ in points]
    outputs = [o for _, o in points]
    scale = (at - xs[-1]) / (xs[-1] - xs[-2])
    if len(points) == 2:  # o2 + (o2 - o1) * scale: three tensor operations
        return tree.tree_map(lambda a, c: c + (c - a) * scale, *outputs)
    weights = lagrange_weights(xs, at)
    if limited:
        return tree.tree_map(lambda *os: limited_forecast2(os, weights, scale, FORECAST2_LIMIT), *outputs)
    return tree.tree_map(lambda *os: sum(w * o for w, o in zip(weights, os)), *outputs)


def from_outputs(engine: "Engine", outputs: list[tuple[int, Any]], code: str, step: int) -> Any:
    """What reuse (``R``) or a forecast (``F``, ``Q``, ``L``) gives at ``step`` from the computed ``outputs``
    (``(step, output)``, oldest first; enough of them for the code's order)."""
    if code == "R":
        return outputs[-1][1]
    return forecast(engine, outputs[-1 - FORECAST_ORDER[code]:], step, limited=code == "L")


def _sample_norms(x: torch.Tensor) -> torch.Tensor:
    """The Euclidean norm of each sample of ``x`` (leading dimension; a 0-d tensor is one), broadcastable to ``x``."""
    rows = x.reshape(x.shape[0] if x.dim() else 1, -1).float()
    return torch.linalg.vector_norm(rows, dim=1).reshape(x.shape[:1] + (1,) * max(0, x.dim() - 1))


class _BranchCache:
    """What one module keeps for one CFG branch: its last computed outputs with their steps (one, or
    as many as its forecasts need), and for ``reuse_residual`` the inputs of the last compute."""

    __slots__ = ("outputs", "inputs", "call_shapes", "share_checked")

    def __init__(self) -> None:
        self.outputs: list[tuple[int, Any]] = []  # [(step, output tree)], oldest first, at most 2
        self.inputs: dict[int, torch.Tensor | None] | None = None
        self.call_shapes: Any = None  # shapes of the first computing call's arguments (plans with S only)
        self.share_checked = False  # this branch's outputs were found to fit the other's (once per run)


class CacheHook(ModelHook):
    """Per-module hook: compute, reuse, reuse_residual, forecast, share_cfg, or a soft gate.

    Per branch it keeps the last computed output(s) and, for blocks that reuse residuals, the
    inputs of that compute. HarmoniCa's rule: entries are written only when the module computes
    (a shared or reused step leaves them as they were); a gated module stores its mixed output.
    """

    _is_stateful = True

    def __init__(self, engine: "Engine", name: str, module: torch.nn.Module, codes: dict[str, str] | None,
                 gate_col: int | None, ready_for_all: bool = False):
        super().__init__()
        self.engine = engine
        self.name = name
        self.cls = type(module)
        self.gate_col = gate_col
        self.is_block = module_kind(name)[0] == "block"
        self.keep = {b: 1 for b in BRANCHES}
        self.residual = None
        if gate_col is not None and self.is_block:  # a gated block's reuse side is residual reuse (D)
            self.residual = tree.ResidualMap(self.cls)
        self.caches: dict[str, _BranchCache] = {}
        self.codes = None
        self.checks_share = False  # whether any decision shares CFG (S): then calls record their shapes
        if codes is not None:
            self.set_codes(codes, ready_for_all)

    def set_codes(self, codes: dict[str, str], ready_for_all: bool = False) -> None:
        """Take ``codes`` as this module's decisions, keeping what forecasts / residual reuse will need."""
        self.codes = dict(codes)
        for b in BRANCHES:
            planned = self.codes.get(b, "")
            order = max((FORECAST_ORDER.get(c, 0) for c in set(planned)), default=0)
            need = 3 if ready_for_all else 1 + order
            self.keep[b] = max(self.keep[b], need)
        self.checks_share = any("S" in c for c in self.codes.values())
        wants_residual = ready_for_all and self.is_block or any("D" in c for c in self.codes.values())
        if wants_residual and self.residual is None:
            self.residual = tree.ResidualMap(self.cls)

    def snapshot(self) -> dict:
        """References to this module's cache entries (entries are replaced, never mutated, on writes)."""
        return {b: (e.outputs, e.inputs) for b, e in self.caches.items()}

    def restore(self, state: dict) -> None:
        self.caches = {}
        for b, (outputs, inputs) in state.items():
            entry = self.caches[b] = _BranchCache()
            entry.outputs, entry.inputs = outputs, inputs

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.caches.clear()
        return module

    # ------------------------------------------------------------------ the forward
    @_eager
    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        eng = self.engine
        if not eng.in_call:  # called outside a tracked transformer call (e.g. directly): plain module
            return self.fn_ref.original_forward(*args, **kwargs)
        step, active = eng.step, eng.active[-1]
        if self.gate_col is not None:
            return self._gated(step, active, args, kwargs)

        planned = [self.codes[b][step] for b in active]
        if all(c == COMPUTE for c in planned):  # the common case: one call on the whole batch
            out = self.fn_ref.original_forward(*args, **kwargs)
            self._store(step, active, active, out, args, kwargs)
            for b in active:
                eng.log(self.name, b, step, COMPUTE)
            return out
        return self._mixed(step, active, planned, args, kwargs)

    @_eager
    def _mixed(self, step: int, active: tuple[str, ...], planned: list[str], args: tuple, kwargs: dict) -> Any:
        eng = self.engine
        resolved: dict[str, str] = {}
        for b, code in zip(active, planned):
            if code != "S":
                resolved[b] = self._resolve(b, code)
        for b, code in zip(active, planned):
            if code == "S":
                other = other_branch(b)
                if other in resolved:
                    ok = resolved[other] == COMPUTE
                else:  # separate calls: the other branch's call already ran this step
                    entry = self.caches.get(other)
                    ok = entry is not None and bool(entry.outputs) and entry.outputs[-1][0] == step
                    if ok:
                        self._check_share(b, other, step, args, kwargs)
                resolved[b] = "S" if ok else COMPUTE
        computing = tuple(b for b in active if resolved[b] == COMPUTE)

        fresh: dict[str, Any] = {}
        if computing == active:
            out = self.fn_ref.original_forward(*args, **kwargs)
            self._store(step, active, active, out, args, kwargs)
            for b in active:  # everything fell back to compute
                eng.log(self.name, b, step, COMPUTE)
            return out
        if computing:
            full = tree.call_batch(self.cls, args, kwargs)
            per = full // len(active)
            idx = [active.index(b) for b in computing]
            lo, hi = idx[0] * per, (idx[-1] + 1) * per  # two branches: any subset is contiguous
            sub_args, sub_kwargs = tree.slice_call(self.cls, args, kwargs, lo, hi, full)
            eng.active.append(computing)  # sub-modules inside see only the computed halves
            try:
                out_sub = self.fn_ref.original_forward(*sub_args, **sub_kwargs)
            finally:
                eng.active.pop()
            fresh = dict(zip(computing, tree.split(out_sub, len(computing))))
            self._store(step, computing, active, out_sub, args, kwargs, fresh=fresh)

        parts = []
        for b, code in zip(active, planned):
            r = resolved[b]
            if r == COMPUTE:
                part = fresh[b]
            elif r == "R" or r in FORECAST_ORDER:
                part = from_outputs(self.engine, self.caches[b].outputs, r, step)
            elif r == "D":
                entry = self.caches[b]
                now = self._branch_inputs(b, active, args, kwargs)
                part = self.residual.apply(entry.outputs[-1][1], entry.inputs, now)
            else:  # "S"
                other = other_branch(b)
                part = fresh[other] if other in fresh else self.caches[other].outputs[-1][1]
            parts.append(part)
            eng.log(self.name, b, step, r)
        return tree.cat(parts)

    @_python
    def _resolve(self, branch: str, code: str) -> str:
        """The action really taken: reuse with nothing cached computes; a forecast from fewer outputs than its
        order needs takes the highest order they allow (one output: reuse)."""
        entry = self.caches.get(branch)
        taken = action_taken(code, len(entry.outputs) if entry is not None else 0)
        if taken == "D" and entry.inputs is None:
            return COMPUTE
        return taken

    # ------------------------------------------------------------------ soft gates
    @_eager
    def _gated(self, step: int, active: tuple[str, ...], args: tuple, kwargs: dict) -> Any:
        eng = self.engine
        s = eng.gates[step, self.gate_col]
        out = self.fn_ref.original_forward(*args, **kwargs)
        parts = tree.split(out, len(active))
        mixed = []
        for b, fresh in zip(active, parts):
            entry = self.caches.get(b)
            now = self._branch_inputs(b, active, args, kwargs) if self.residual is not None else None
            if entry is None or not entry.outputs:  # first step: fresh
                m = fresh
            else:
                cached = entry.outputs[-1][1]
                if now is not None:  # blocks: this step's input + the stored residual, what "D" returns
                    cached = self.residual.apply(cached, entry.inputs, now)
                m = tree.tree_map(lambda f, c: s * f + (1 - s) * c, fresh, cached)
            mixed.append(m)
            stored = tree.tree_map(torch.Tensor.detach, m) if eng.detach_cache else m
            entry = self.caches.setdefault(b, _BranchCache())
            entry.outputs = [(step, stored)]
            if now is not None:  # stored residual = m - now: with s = 0 the old residual carries on, as with "D"
                entry.inputs = {k: v.detach() if eng.detach_cache and v is not None else v for k, v in now.items()}
            eng.log(self.name, b, step, COMPUTE)
        return tree.cat(mixed)

    # ------------------------------------------------------------------ cache writes
    @_python
    def _store(self, step: int, computed: tuple[str, ...], active: tuple[str, ...], out: Any, args: tuple, kwargs: dict, fresh: dict | None = None) -> None:
        if fresh is None:
            fresh = dict(zip(computed, tree.split(out, len(computed))))
        for b in computed:
            entry = self.caches.get(b)
            if entry is None:
                entry = self.caches[b] = _BranchCache()
            older = [o for o in entry.outputs if o[0] != step]  # a step replayed via at_step replaces itself
            entry.outputs = older[-(self.keep[b] - 1):] if self.keep[b] > 1 else []
            entry.outputs.append((step, fresh[b]))
            if self.residual is not None:
                entry.inputs = self._branch_inputs(b, active, args, kwargs)
            if self.checks_share and len(active) == 1 and entry.call_shapes is None:  # separate calls: own
                entry.call_shapes = call_shapes(args, kwargs)  # shapes stay within a run: read once

    @_python
    def _check_share(self, branch: str, other: str, step: int, args: tuple, kwargs: dict) -> None:
        """PlannerError when the other branch's output of this step cannot stand in for this branch's
        (separate calls): their outputs differ in shape, or, before this branch computed any, the calls'
        arguments do (:mod:`planner.executor.shapes`). Shapes do not change within a run (the caches are
        new at every run), so once the outputs agree they are not compared again."""
        theirs = self.caches[other]
        own = self.caches.get(branch)
        if own is not None and own.outputs:
            if not own.share_checked:
                check_share(self.name, branch, other, step, tree_shapes(own.outputs[-1][1]),
                            tree_shapes(theirs.outputs[-1][1]), "outputs")
                own.share_checked = True
        elif theirs.call_shapes is not None:
            check_share(self.name, branch, other, step, call_shapes(args, kwargs), theirs.call_shapes, "inputs")

    @_python
    def _branch_inputs(self, branch: str, active: tuple[str, ...], args: tuple, kwargs: dict) -> dict:
        inputs = self.residual.inputs(args, kwargs)
        if len(active) == 1:
            return inputs
        i, n = active.index(branch), len(active)

        def part(t):
            if not isinstance(t, torch.Tensor):
                return t
            size = t.shape[0] // n
            return t.narrow(0, i * size, size)

        return {pos: part(t) for pos, t in inputs.items()}
