"""The executor: applies a cache plan to any diffusers pipeline or transformer through diffusers hooks.

``apply_plan(pipe, plan)`` puts a step tracker on the transformer and a :class:`CacheHook` on each
module whose decisions are not all ``compute``; it returns a :class:`PlanHandle` (also a context
manager) with ``remove()`` and ``stats()``. No class is patched; after ``remove()`` the modules are
as they were.

What each action returns (per CFG branch, per module):

* ``compute`` (C): run the module; its cache entry for this branch becomes this output.
* ``reuse`` (R): the last computed output. On attention/MLP sub-layers that is the output before
  the block applies its gate and residual, so the current step's modulation is still applied (L2C).
* ``reuse_residual`` (D, blocks only): this step's input plus the last computed residual,
  ``x_now + (out_c - x_c)``, for every stream the block returns (diffusers'
  ``TransformerBlockRegistry`` maps ``(encoder_hidden_states, hidden_states)`` outputs to their
  inputs; a ``None`` output such as SD3's last block's stays ``None``). Residuals telescope:
  when blocks i..j all last computed at the same step and all reuse their residuals now, the
  result is ``x_i,now + (out_j,c - x_i,c)``, the range residual (equal up to float rounding).
* ``forecast`` (F): ``o2 + (o2 - o1) * (k - m2) / (m2 - m1)`` from the last two computed outputs
  ``o1`` (step m1) and ``o2`` (step m2), at step k: first-order Taylor / Adams-Bashforth 2 in step
  units. With only one output cached it reuses it.
* ``share_cfg`` (S): this branch gets the other branch's fresh output of this step (the module
  runs once, on the other half only). Its own cache entry is left as it was.

Caches follow HarmoniCa's rule: an entry is refreshed only when its module computes. The first
step always computes (plans are checked for it). A reuse with nothing cached computes instead and
counts as a fallback in ``stats()``. When only one CFG half computes, the module runs on that half
(batch-dimension arguments sliced; rotary embeddings never) and the full output is assembled.

Soft gates (learned strategies, L2C/HarmoniCa): ``apply_plan(target, plan, gates=g)`` or
:func:`apply_gates` make every gated module compute and return ``s * fresh + (1 - s) * cached``
with ``s = g[step, j]`` read at call time (so an optimizer may update ``g`` between steps),
differentiable with respect to ``g``. The stored entry is the mixed output, detached unless
``detach_cache=False``. With all gates 1 the outputs equal the compute path exactly. A gated
*block* mixes with residual reuse instead, ``s * fresh + (1 - s) * (x_now + stored residual)``, and
stores ``(mixed, x_now)``, so that gates of 0 behave as ``D`` does.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from planner.errors import PlannerError
from planner.plan import CFG_NONE, Plan, load_plan, module_kind

__all__ = ["apply_plan", "apply_gates", "PlanHandle"]


class PlanHandle:
    """A plan applied to one transformer. Use as a context manager or call :meth:`remove`."""

    def __init__(self, plan: Plan, transformer: torch.nn.Module, engine: Any, installed: list[tuple[torch.nn.Module, str, dict]]):
        self.plan = plan
        self.transformer = transformer
        self._engine = engine
        self._installed = installed
        self._removed = False

    @property
    def active(self) -> bool:
        """Whether the hooks are still installed."""
        return not self._removed

    @property
    def hooked_modules(self) -> list[str]:
        """Names of the modules carrying a cache hook (those whose decisions are not all compute, or gated)."""
        return list(self._engine.hooks)

    def stats(self) -> dict:
        """What ran, over all runs so far (a run in progress included, marked ``run_in_progress``).

        Keys: ``runs``; ``decisions`` = (module, branch, step) triples of the steps that ran, split
        into ``as_planned`` + ``skipped_with_parent`` (a sub-layer whose block was not computed) +
        ``fallbacks`` (reuse with nothing cached -> computed; forecast with one entry -> reused;
        details in ``fallback_kinds``, ``fallback_examples``); ``reuse_hits`` per reuse action;
        ``computed_fraction_per_step`` / ``computed_fraction`` of the last run (share of
        (leaf module, branch) pairs that computed: sub-layers, and blocks without sub-layers);
        ``executed``: the last run's actions in plan notation, for hooked or skipped modules
        (``-`` = not run because the enclosing block was not computed).
        """
        return self._engine.stats()

    def reset(self) -> None:
        """Clear all caches; the next call starts a new run."""
        self._engine.reset()

    @contextlib.contextmanager
    def at_step(self, step: int) -> Iterator["PlanHandle"]:
        """Treat the calls inside as step ``step`` (for callers that drive steps themselves, e.g. L2C
        training on step pairs, or a search replaying one step). Caches persist across blocks until
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
        """Replace ``module``'s decisions (``{branch: codes}``) in place, for searches that decide step by
        step. The module must carry a hook (apply with ``hook_all=True``); the plan object is not changed."""
        hook = self._engine.hooks.get(module)
        if hook is None or hook.gate_col is not None:
            raise PlannerError(f"{module!r} carries no plan hook: apply the plan with hook_all=True to edit it")
        hook.set_codes(codes)

    def snapshot(self) -> dict:
        """The cache state of every hooked module. Cheap: it holds references, and stored tensors are
        never written in place. :meth:`restore` brings it back (a search tries actions, then rewinds)."""
        return {name: hook.snapshot() for name, hook in self._engine.hooks.items()}

    def restore(self, snapshot: dict) -> None:
        """Put back a state taken by :meth:`snapshot` of this handle."""
        for name, state in snapshot.items():
            self._engine.hooks[name].restore(state)

    def remove(self) -> None:
        """Take every hook off and drop the caches; the modules are exactly as before. Idempotent."""
        if self._removed:
            return
        from diffusers.hooks import HookRegistry

        self._engine.reset()
        for module, hook_name, before in reversed(self._installed):
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None:
                continue
            registry.remove_hook(hook_name, recurse=False)
            if registry.hooks:
                continue  # someone else's hooks remain: leave their chain alone
            if not before["had_registry"]:
                del module._diffusers_hook
            if not before["had_forward"] and "forward" in vars(module):
                del module.forward  # HookRegistry leaves the bound original forward on the instance
        root = getattr(self.transformer, "_diffusers_hook", None)
        if isinstance(root, HookRegistry):
            root.invalidate_child_registries_cache()
        self._removed = True

    def __enter__(self) -> "PlanHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else f"{len(self._engine.hooks)} hooked modules"
        return f"PlanHandle({self.plan.model.cls}, {self.plan.steps} steps, {state})"


def _targets(target: Any) -> tuple[torch.nn.Module, Any]:
    """``(transformer, pipeline or None)`` from a pipeline, a Runner or a (possibly compiled) transformer."""
    if hasattr(target, "pipe") and hasattr(target, "family"):  # Runner
        target = target.pipe
    inner = getattr(target, "transformer", None)
    # torch.compile wraps a module: the hooks go on the module inside, which the wrapper still calls
    if isinstance(inner, torch.nn.Module):
        return getattr(inner, "_orig_mod", inner), target
    if isinstance(target, torch.nn.Module):
        return getattr(target, "_orig_mod", target), None
    raise PlannerError(f"cannot apply a plan to a {type(target).__name__}: pass a pipeline, a Runner or a transformer")


def apply_plan(
    target: Any,
    plan: Plan | str | Path,
    *,
    gates: torch.Tensor | None = None,
    gate_modules: Sequence[str] | None = None,
    detach_cache: bool = True,
    strict: bool = True,
    hook_all: bool = False,
) -> PlanHandle:
    """Apply ``plan`` (a Plan or a plan file) to a pipeline, Runner or transformer; returns the handle.

    Checks first (PlannerError on a mismatch): the plan's own rules, and that it fits the model
    (class, block count, module names, and with ``strict`` the fingerprint). At the first call of
    every run it checks the pipeline's step count and CFG switch when given a pipeline, and during
    the run the number of steps and calls per step.

    With ``gates`` (a ``[plan.steps, len(gate_modules)]`` tensor in [0, 1]) the plan must be
    all-compute and the listed modules (default: every attention/cross-attention/MLP sub-layer, in
    forward order) are soft-gated instead (see the module docstring).

    ``hook_all`` hooks every module, all-compute ones too, ready for any action, so that a search
    can change decisions during a run with :meth:`PlanHandle.set_codes`.
    """
    from diffusers.hooks import HookRegistry

    from planner.executor.engine import Engine
    from planner.executor.hooks import MODULE_HOOK, TRACKER_HOOK, CacheHook, StepTrackerHook

    transformer, pipe = _targets(target)
    if not isinstance(plan, Plan):
        plan = load_plan(plan)
    plan.validate()
    plan.check_model(transformer, strict=strict)

    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(TRACKER_HOOK) is not None:
        raise PlannerError("a cache plan is already applied to this transformer; remove its handle first")

    modules = dict(transformer.named_modules())
    gate_cols: dict[str, int] = {}
    if gates is not None:
        hard = [m for m in plan.decisions if not plan.is_all_compute(m)]
        if hard:
            raise PlannerError(f"gates replace the plan's actions: pass an all-compute plan (this one reuses {hard[0]!r})")
        if gate_modules is None:
            gate_modules = [m for m in plan.model.modules if module_kind(m)[0] in ("attn", "cross_attn", "mlp")]
        gate_modules = list(gate_modules)
        unknown = [m for m in gate_modules if m not in modules]
        if unknown:
            raise PlannerError(f"gate module {unknown[0]!r} is not a module of this {type(transformer).__name__}")
        if len(set(gate_modules)) != len(gate_modules):
            raise PlannerError("gate modules must be distinct")
        if gates.dim() != 2 or tuple(gates.shape) != (plan.steps, len(gate_modules)):
            raise PlannerError(f"gates must have shape [{plan.steps}, {len(gate_modules)}] (steps x gated modules), got {list(gates.shape)}")
        gate_cols = {m: j for j, m in enumerate(gate_modules)}

    engine = Engine(plan, transformer, pipe, gates, detach_cache)
    installed: list[tuple[torch.nn.Module, str, dict]] = []

    def install(module: torch.nn.Module, hook: Any, name: str) -> None:
        before = {"had_registry": hasattr(module, "_diffusers_hook"), "had_forward": "forward" in vars(module)}
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
        installed.append((module, name, before))

    handle = PlanHandle(plan, transformer, engine, installed)
    try:
        install(transformer, StepTrackerHook(engine), TRACKER_HOOK)
        for name in plan.model.modules:
            if name in gate_cols:
                hook = CacheHook(engine, name, modules[name], None, gate_cols[name])
            elif hook_all or not plan.is_all_compute(name):
                # all-compute modules get no hook at all: that is what keeps an identity plan nearly free
                hook = CacheHook(engine, name, modules[name], plan.decisions[name], None, ready_for_all=hook_all)
            else:
                continue
            install(modules[name], hook, MODULE_HOOK)
            engine.hooks[name] = hook
        HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    except BaseException:
        handle.remove()
        raise
    return handle


def apply_gates(
    target: Any,
    gates: torch.Tensor,
    modules: Sequence[str] | None = None,
    *,
    cfg_layout: str = CFG_NONE,
    detach_cache: bool = True,
) -> PlanHandle:
    """Soft-gate ``modules`` of a pipeline/Runner/transformer: ``gates`` is ``[steps, len(modules)]``.

    A shortcut for :func:`apply_plan` with an all-compute plan of ``gates.shape[0]`` steps and the
    given CFG layout (which must be the one the calls use: ``separate`` for two calls per step).
    """
    transformer, _ = _targets(target)
    plan = Plan.for_model(transformer, steps=int(gates.shape[0]), cfg_layout=cfg_layout, strategy="gates")
    return apply_plan(target, plan, gates=gates, gate_modules=modules, detach_cache=detach_cache)
