"""Hooks that watch a transformer during a pipeline run: which step and CFG branch a call belongs to,
and what each cacheable module received and returned.

Everything here is attached with diffusers' ``HookRegistry`` and taken off again by
:func:`detach_hooks`, which also removes the bookkeeping diffusers leaves on a module (its
``_diffusers_hook`` registry and the instance-level ``forward``), so a profiled model is exactly
the model it was before.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager

from planner.cfg import COND, UNCOND, CfgLayout, branch_of_context, cfg_halves
from planner.errors import PlannerError
from planner.modules import CacheableModule

HOOK_PREFIX = "dit-cache-planner.profile"
ROUTE_HOOK = "dit-cache-planner.route"  # planner.executor.pair's routing hook


def split_branches(t: torch.Tensor, layout: CfgLayout, call_branch: str | None) -> dict[str, torch.Tensor]:
    """Split one module output along the batch into its CFG branches.

    Batched layouts carry both branches in one call (``cond_uncond``: first half cond, DiT;
    ``uncond_cond``: first half uncond, PixArt/SD3). ``none`` and ``separate`` calls carry one
    branch only, which the caller names (``call_branch``).
    """
    if CfgLayout(layout).batched:
        cond, uncond = cfg_halves(t, layout)
        return {COND: cond, UNCOND: uncond}
    return {call_branch or COND: t}


def output_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a module output (a tensor, a tuple such as SD3's ``(encoder, hidden)``, or a
    diffusers output object), in order; ``None`` entries (SD3's last block) are dropped."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [o for o in output if isinstance(o, torch.Tensor)]
    if hasattr(output, "values"):
        return [o for o in output.values() if isinstance(o, torch.Tensor)]
    return []


def input_tensors(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(hidden_states, encoder_hidden_states)`` of a module call, either one ``None`` when absent."""
    hidden = kwargs.get("hidden_states")
    if hidden is None and args and isinstance(args[0], torch.Tensor):
        hidden = args[0]
    enc = kwargs.get("encoder_hidden_states")
    if enc is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        enc = args[1]
    return hidden, (enc if isinstance(enc, torch.Tensor) else None)


def pair_residual_inputs(
    kind: str, outs: list[torch.Tensor], hidden: torch.Tensor | None, enc: torch.Tensor | None
) -> list[torch.Tensor | None]:
    """For each output tensor, the input it is a residual update of (same shape), or ``None``.

    Tuple outputs name their parts by position: SD3/Flux *blocks* return ``(encoder, hidden)``,
    joint *attention* returns ``(hidden, encoder)``. Shapes decide when they are unambiguous, the
    convention when the two streams happen to have the same shape (tiny test models).
    """

    def same(a, b):
        return b is not None and a.shape == b.shape

    if len(outs) == 1:
        return [hidden if same(outs[0], hidden) else None]
    order = (enc, hidden) if kind == "block" else (hidden, enc)
    paired: list[torch.Tensor | None] = []
    for i, o in enumerate(outs):
        conventional = order[i] if i < 2 else None
        if same(o, conventional):
            paired.append(conventional)
            continue
        candidates = [x for x in (hidden, enc) if same(o, x)]
        paired.append(candidates[0] if len(candidates) == 1 else None)
    return paired


class _NoState:
    def reset(self, *args, **kwargs) -> None:
        pass


class StepTracker(ModelHook):
    """Outermost hook on the transformer: knows the current step index and, for the ``separate``
    layout, which branch the current call computes.

    It is *stateful* only so that diffusers' ``cache_context("cond"/"uncond")`` (opened by the
    Flux and Wan pipelines around their two calls) reaches it; without a context the calls of a
    step alternate cond, uncond.
    """

    _is_stateful = True

    def __init__(self, layout: CfgLayout, on_call: Callable[["StepTracker"], None] | None = None,
                 on_return: Callable[["StepTracker"], None] | None = None):
        super().__init__()
        self.layout = CfgLayout(layout)
        self.state = StateManager(_NoState)
        self.on_call = on_call
        self.on_return = on_return
        self.step = -1
        self.calls = 0
        self.branch: str | None = None

    def pre_forward(self, module, *args, **kwargs):
        if self.layout is CfgLayout.SEPARATE:
            ctx = self.state._context
            name = branch_of_context(ctx.name if ctx is not None else None) or (COND if self.calls % 2 == 0 else UNCOND)
            if name == COND:
                self.step += 1
            self.branch = name
        else:
            self.step += 1
            self.branch = COND if self.layout is CfgLayout.NONE else None
        self.calls += 1
        if self.on_call is not None:
            self.on_call(self)
        return args, kwargs

    def post_forward(self, module, output):
        if self.on_return is not None:
            self.on_return(self)
        return output

    def reset_state(self, module):
        # Pipelines reset stateful hooks when a run ends (``maybe_free_model_hooks``); the counters
        # must survive that, since they are read after the run. A tracker serves one run only.
        return module


class ModuleWatch(ModelHook):
    """Hands ``(index, args, kwargs, output)`` of every call of one module to ``sink``; changes nothing."""

    def __init__(self, index: int, sink: Callable[[int, tuple, dict, Any], None]):
        super().__init__()
        self.index = index
        self.sink = sink
        self._call: tuple | None = None

    def pre_forward(self, module, *args, **kwargs):
        self._call = (args, kwargs)
        return args, kwargs

    def post_forward(self, module, output):
        args, kwargs = self._call or ((), {})
        self._call = None
        self.sink(self.index, args, kwargs, output)
        return output


class HookSet:
    """Hooks this package attached, so that exactly these come off again (see :func:`detach_hooks`)."""

    def __init__(self):
        self._entries: list[tuple[torch.nn.Module, str, bool, bool]] = []

    def add(self, module: torch.nn.Module, hook: ModelHook, name: str) -> None:
        had_registry = hasattr(module, "_diffusers_hook")
        had_forward = "forward" in module.__dict__
        registry = HookRegistry.check_if_exists_or_initialize(module)
        registry.register_hook(hook, f"{HOOK_PREFIX}.{name}")
        self._entries.append((module, f"{HOOK_PREFIX}.{name}", had_registry, had_forward))

    def remove(self) -> None:
        """Take every hook off; drop the registry and instance ``forward`` diffusers added, if we caused them."""
        for module, name, had_registry, had_forward in reversed(self._entries):
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None:
                continue
            registry.remove_hook(name, recurse=False)
            if not registry.hooks and not had_registry:
                del module._diffusers_hook
            if not had_forward and "forward" in module.__dict__ and not getattr(module, "_diffusers_hook", None):
                del module.__dict__["forward"]
        self._entries.clear()


def attach(root: torch.nn.Module, hooks: Iterable[tuple[torch.nn.Module, ModelHook, str]]) -> HookSet:
    """Attach ``(module, hook, name)`` triples; returns the set to remove later."""
    hs = HookSet()
    try:
        for module, hook, name in hooks:
            hs.add(module, hook, name)
    except Exception:
        hs.remove()
        raise
    registry = getattr(root, "_diffusers_hook", None)
    if registry is not None:
        registry.invalidate_child_registries_cache()
    return hs


def detach_hooks(root: torch.nn.Module, hooks: HookSet) -> None:
    """Remove ``hooks`` and refresh diffusers' cached list of child registries under ``root``."""
    hooks.remove()
    registry = getattr(root, "_diffusers_hook", None)
    if registry is not None:
        registry.invalidate_child_registries_cache()


def foreign_hooks(transformer: torch.nn.Module) -> list[str]:
    """Names of diffusers hooks someone else left on the transformer (they would distort a profile)."""
    found = []
    for name, module in transformer.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            found += [f"{name or '<transformer>'}:{h}" for h in registry.hooks
                      if not h.startswith((HOOK_PREFIX, ROUTE_HOOK))]  # the pair's routing (Wan 2.2) is ours
    return found


def resolve_modules(transformer: torch.nn.Module, modules: list[CacheableModule]) -> list[torch.nn.Module]:
    """The ``nn.Module`` objects of ``modules``, by dotted name."""
    named = dict(transformer.named_modules())
    missing = [m.name for m in modules if m.name not in named]
    if missing:
        raise PlannerError(f"modules not found in the transformer: {', '.join(missing[:5])}")
    return [named[m.name] for m in modules]
