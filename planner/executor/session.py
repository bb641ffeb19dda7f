"""How the executor's hooks are installed, and the session strategies drive them through (internal).

:func:`install` is the one place hooks go on a transformer, for :func:`planner.executor.apply_plan`
and for the strategies. What strategies need beyond a plain applied plan, through
:func:`open_session` / :func:`apply_gates`:

* **soft gates** (learned routers, L2C/HarmoniCa): every gated module computes and returns
  ``s * fresh + (1 - s) * cached`` with ``s = gates[step, j]`` read at call time (so an optimizer may
  update the tensor between steps), differentiable with respect to ``gates``. The stored entry is
  the mixed output, detached unless ``detach_cache=False``. With all gates 1 the outputs equal the
  compute path exactly. A gated *block* mixes with residual reuse instead,
  ``s * fresh + (1 - s) * (x_now + stored residual)``, and stores ``(mixed, x_now)``, so that gates
  of 0 behave as ``D`` does;
* **driven steps** (:meth:`ExecutionSession.at_step`): the caller says which step the calls belong
  to (training on step pairs, a search replaying one step);
* **editing** (``editable=True``): every module is hooked, ready for any action, and
  :meth:`ExecutionSession.set_codes` changes a module's decisions during a run, while
  :meth:`~ExecutionSession.snapshot` / :meth:`~ExecutionSession.restore` rewind the caches (greedy
  tries actions, then rewinds).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from planner.cfg import CfgLayout
from planner.errors import PlannerError
from planner.executor.handle import PlanHandle
from planner.modules import SUBLAYER_KINDS, module_kind, transformer_of
from planner.plan import Plan, load_plan, plan_for_model


class ExecutionSession(PlanHandle):
    """A :class:`PlanHandle` a strategy can also drive: steps, decisions, cache snapshots."""

    @contextlib.contextmanager
    def at_step(self, step: int) -> Iterator["ExecutionSession"]:
        """Treat the calls inside as step ``step``. Caches persist across ``with`` blocks until
        :meth:`reset`; each ``with`` block is one step."""
        if not 0 <= step < self.plan.steps:
            raise PlannerError(f"step {step} is outside the plan's {self.plan.steps} steps")
        eng = self._engine
        eng.forced_step, eng.forced_token = int(step), object()
        try:
            yield self
        finally:
            eng.forced_step, eng.forced_token = None, None

    def set_codes(self, module: str, codes: dict[str, str]) -> None:
        """Replace ``module``'s decisions (``{branch: codes}``) in place (the plan object is not changed).
        Needs a session opened with ``editable=True``."""
        hook = self._engine.hooks.get(module)
        if hook is None or hook.gate_col is not None:
            raise PlannerError(f"{module!r} carries no plan hook: open the session with editable=True to edit it")
        hook.set_codes(codes)

    def snapshot(self) -> dict:
        """The cache state of every hooked module. Cheap: it holds references, and stored tensors are
        never written in place. :meth:`restore` brings it back."""
        return {name: hook.snapshot() for name, hook in self._engine.hooks.items()}

    def restore(self, snapshot: dict) -> None:
        """Put back a state taken by :meth:`snapshot` of this session."""
        for name, state in snapshot.items():
            self._engine.hooks[name].restore(state)


def open_session(target: Any, plan: Plan, *, editable: bool = False, gates: torch.Tensor | None = None,
                 gate_modules: Sequence[str] | None = None, detach_cache: bool = True,
                 strict: bool = True) -> ExecutionSession:
    """Apply ``plan`` for a strategy (see the module docstring); returns the session.

    With ``gates`` (a ``[plan.steps, len(gate_modules)]`` tensor in [0, 1]) the plan must be
    all-compute and the listed modules (default: every attention/cross-attention/MLP sub-layer, in
    forward order) are soft-gated. ``editable`` hooks every module, all-compute ones too.
    """
    return install(ExecutionSession, target, plan, strict=strict, editable=editable, gates=gates,
                   gate_modules=gate_modules, detach_cache=detach_cache)


def apply_gates(target: Any, gates: torch.Tensor, modules: Sequence[str] | None = None, *,
                cfg_layout: CfgLayout = CfgLayout.NONE, detach_cache: bool = True) -> ExecutionSession:
    """Soft-gate ``modules`` of a pipeline/Runner/transformer: ``gates`` is ``[steps, len(modules)]``.

    An all-compute plan of ``gates.shape[0]`` steps and the given CFG layout (the one the calls use:
    ``separate`` for two calls per step), opened with those gates.
    """
    from planner.executor.pair import transformer_components

    pipe = target.pipe if hasattr(target, "pipe") and hasattr(target, "family") else target
    if len(transformer_components(pipe)) > 1:
        raise PlannerError(f"soft gates (the learned strategies l2c and harmonica) cover one transformer so far, and "
                           f"this {type(pipe).__name__} runs {len(transformer_components(pipe))} (Wan 2.2); search it "
                           "with greedy, uniform, smoothcache or optuna")
    plan = plan_for_model(target, steps=int(gates.shape[0]), cfg_layout=cfg_layout, strategy="gates")
    return open_session(target, plan, gates=gates, gate_modules=modules, detach_cache=detach_cache)


def install(handle_cls: type[PlanHandle], target: Any, plan: Plan | str | Path, *, strict: bool = True,
            editable: bool = False, gates: torch.Tensor | None = None, gate_modules: Sequence[str] | None = None,
            detach_cache: bool = True) -> PlanHandle:
    """Check ``plan`` against ``target`` and put the tracker and the cache hooks on it (see the callers)."""
    from diffusers.hooks import HookRegistry

    from planner.executor.engine import Engine
    from planner.executor.hooks import MODULE_HOOK, TRACKER_HOOK, CacheHook, StepTrackerHook

    from planner.executor.pair import pair_of

    transformer, pipe = _targets(target)
    if not isinstance(plan, Plan):
        plan = load_plan(plan)
    plan.validate()
    installed: list[tuple[torch.nn.Module, str, dict]] = []

    def put(module: torch.nn.Module, hook: Any, name: str) -> None:
        before = {"had_registry": hasattr(module, "_diffusers_hook"), "had_forward": "forward" in vars(module)}
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
        installed.append((module, name, before))

    # several transformers (Wan 2.2): the hooks go on the pair every call of either one goes through
    pair, made = pair_of(pipe, put) if pipe is not None else (None, False)
    try:
        if pair is not None:
            transformer = pair
        plan.check_model(transformer, strict=strict)
        registry = getattr(transformer, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(TRACKER_HOOK) is not None:
            raise PlannerError("a cache plan is already applied to this transformer; remove its handle first")
        modules = dict(transformer.named_modules())
        gate_cols = _gate_columns(plan, transformer, modules, gates, gate_modules) if gates is not None else {}
        engine = Engine(plan, transformer, pipe, gates, detach_cache, strict=strict)
    except BaseException:
        if made:
            pair.detach()
        raise
    handle = handle_cls(plan, transformer, engine, installed)
    try:
        put(transformer, StepTrackerHook(engine), TRACKER_HOOK)
        for name in plan.model.modules:
            if name in gate_cols:
                hook = CacheHook(engine, name, modules[name], None, gate_cols[name])
            elif editable or not plan.is_all_compute(name):
                # all-compute modules get no hook at all: that is what keeps an identity plan nearly free
                hook = CacheHook(engine, name, modules[name], plan.decisions[name], None, ready_for_all=editable)
            else:
                continue
            put(modules[name], hook, MODULE_HOOK)
            engine.hooks[name] = hook
        HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    except BaseException:
        handle.remove()
        raise
    return handle


def _gate_columns(plan: Plan, transformer, modules: dict, gates: torch.Tensor,
                  gate_modules: Sequence[str] | None) -> dict[str, int]:
    """``{module: column of gates}``, after checking the plan is all-compute and the gates' shape."""
    hard = [m for m in plan.decisions if not plan.is_all_compute(m)]
    if hard:
        raise PlannerError(f"gates replace the plan's actions: pass an all-compute plan (this one reuses {hard[0]!r})")
    if plan.served_steps():
        raise PlannerError("gates replace the plan's actions: pass an all-compute plan (this one serves the transformer's output)")
    if gate_modules is None:
        gate_modules = [m for m in plan.model.modules if module_kind(m)[0] in SUBLAYER_KINDS]
    gate_modules = list(gate_modules)
    unknown = [m for m in gate_modules if m not in modules]
    if unknown:
        raise PlannerError(f"gate module {unknown[0]!r} is not a module of this {type(transformer).__name__}")
    if len(set(gate_modules)) != len(gate_modules):
        raise PlannerError("gate modules must be distinct")
    if gates.dim() != 2 or tuple(gates.shape) != (plan.steps, len(gate_modules)):
        raise PlannerError(f"gates must have shape [{plan.steps}, {len(gate_modules)}] (steps x gated modules), got {list(gates.shape)}")
    return {m: j for j, m in enumerate(gate_modules)}


def _targets(target: Any) -> tuple[torch.nn.Module, Any]:
    """``(transformer, pipeline or None)`` from a pipeline, a Runner or a (possibly compiled) transformer.

    torch.compile wraps a module: the hooks go on the module inside, which the wrapper still calls."""
    if hasattr(target, "pipe") and hasattr(target, "family"):  # Runner
        target = target.pipe
    transformer = transformer_of(target)
    if not isinstance(transformer, torch.nn.Module):
        raise PlannerError(f"cannot apply a plan to a {type(target).__name__}: pass a pipeline, a Runner or a transformer")
    pipe = target if transformer is not target and not isinstance(target, torch.nn.Module) else None
    return transformer, pipe
