"""The handle of an applied plan: what ran (``stats``), clearing caches, and taking the hooks off."""

from __future__ import annotations

from typing import Any

import torch

from planner.plan import Plan


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
        into ``as_planned`` + ``skipped_with_parent`` (a sub-layer whose block was not computed, or any
        module at a step whose whole output the plan served) +
        ``fallbacks`` (reuse with nothing cached -> computed; forecast with one entry -> reused;
        details in ``fallback_kinds``, ``fallback_examples``); ``reuse_hits`` per reuse action;
        ``computed_fraction_per_step`` / ``computed_fraction`` of the last run (share of
        (leaf module, branch) pairs that computed: sub-layers, and blocks without sub-layers);
        ``executed``: the last run's actions in plan notation, for hooked or skipped modules
        (``-`` = not run because the enclosing block, or the transformer, was not run); ``output``: what the
        transformer's whole output did at each step of the last run, for plans with an ``output``
        (``None`` otherwise; a forecast with too few outputs kept shows the order it fell back to).
        """
        return self._engine.stats()

    def reset(self) -> None:
        """Clear all caches; the next call starts a new run."""
        self._engine.reset()

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
        return f"{type(self).__name__}({self.plan.model.cls}, {self.plan.steps} steps, {state})"
