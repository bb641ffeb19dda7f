"""A pipeline's several transformers seen as one module (Wan 2.2: ``transformer``, then ``transformer_2``).

Wan 2.2 calls its high-noise ``transformer`` at the steps whose timestep is at least ``boundary_ratio *
num_train_timesteps`` and its low-noise ``transformer_2`` at the others. A :class:`TransformerPair` puts a
small routing hook on each of them: every call, of either one, goes through the pair's own ``forward``
(and so through every hook on the pair) and on to the transformer it was made to, with
:attr:`TransformerPair.current` naming that component during the call. The pair's module names are the
first transformer's as they are (``blocks.0.attn1``: it registers that transformer's block lists as its
own) and the others' under their component name (``transformer_2.blocks.0.attn1``), which is how a plan
names them (:mod:`planner.plan.components`).

So everything that watches "the transformer" (the executor's step tracker, the profiler's passes, the
greedy search's step hook) watches the pair and sees one call sequence over the global steps, and the
executor has one engine per run whichever transformer a step runs on: one implementation of the caching
semantics, the same step and CFG checks. The routing hooks are diffusers hooks on the instances; nothing
is patched on a class, and :meth:`TransformerPair.detach` takes them off.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from diffusers.hooks import HookRegistry
from diffusers.hooks.hooks import BaseState, ModelHook, StateManager, _set_cache_context

from planner.errors import PlannerError
from planner.modules import BLOCK_LISTS

ROUTE_HOOK = "dit-cache-planner.route"
# The pipeline components that hold a transformer, in the order a run uses them.
TRANSFORMER_COMPONENTS = ("transformer", "transformer_2")


def transformer_components(pipe: Any) -> list[str]:
    """The components of ``pipe`` that hold a transformer (``["transformer", "transformer_2"]`` for Wan 2.2)."""
    return [c for c in TRANSFORMER_COMPONENTS if isinstance(getattr(pipe, c, None), torch.nn.Module)]


def boundary_timestep(pipe: Any) -> float | None:
    """Wan 2.2's switch: ``boundary_ratio * num_train_timesteps`` (``None`` without a boundary)."""
    ratio = getattr(getattr(pipe, "config", None), "boundary_ratio", None)
    if ratio is None:
        return None
    return float(ratio) * float(pipe.scheduler.config.num_train_timesteps)


def split_steps(names: Sequence[str], boundary: float | None, timesteps: Sequence[float]) -> dict[str, list[int]]:
    """``{component: global steps it runs}`` for a run with ``timesteps``, by Wan 2.2's rule: the first
    transformer where ``t >= boundary`` (every step without a boundary), the second at the others."""
    if boundary is None:
        return {names[0]: list(range(len(timesteps))), **{c: [] for c in names[1:]}}
    high = [k for k, t in enumerate(timesteps) if float(t) >= boundary]
    return {names[0]: high, names[1]: [k for k in range(len(timesteps)) if k not in high]}


class _ContextOnly(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class _RouteHook(ModelHook):
    """On one transformer of the pair: sends its calls through the pair (stateful only so that the pipeline's
    ``cache_context`` reaches it; the context is handed on to the pair's hooks)."""

    _is_stateful = True

    def __init__(self, pair: "TransformerPair", component: str):
        super().__init__()
        self.pair = pair
        self.component = component
        self.context = StateManager(_ContextOnly)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        pair = self.pair
        if pair.current is not None:  # already inside a routed call (not done by pipelines): run as is
            return self.fn_ref.original_forward(*args, **kwargs)
        ctx = self.context._context
        pair.current, pair._inner = self.component, self.fn_ref.original_forward
        try:
            if ctx is not None:
                _set_cache_context(pair, ctx)
            return pair(*args, **kwargs)
        finally:
            if ctx is not None:
                _set_cache_context(pair, None)
            pair.current, pair._inner = None, None

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        return module


class TransformerPair(torch.nn.Module):
    """The transformers of ``pipe`` as one module (see the module docstring). Make it with :func:`pair_of`."""

    def __init__(self, pipe: Any, names: Sequence[str]):
        super().__init__()
        first = getattr(pipe, names[0])
        self._first = [first]  # a list: not a submodule (its blocks are, under their own names)
        self.planner_class = type(first).__name__
        for list_name in BLOCK_LISTS:
            blocks = getattr(first, list_name, None)
            if isinstance(blocks, torch.nn.ModuleList):
                self.add_module(list_name, blocks)
        others = {c: getattr(pipe, c) for c in names[1:]}
        for c, t in others.items():
            self.add_module(c, t)
        self.planner_components = others  # a plain dict: read by planner.modules.cacheable_modules
        self.component_names = tuple(names)
        self.boundary = boundary_timestep(pipe)
        self.current: str | None = None  # the component the call in progress was made to
        self._inner: Callable | None = None

    # what the planner reads off a transformer, from the first one
    @property
    def first(self) -> torch.nn.Module:
        return self._first[0]

    @property
    def config(self) -> Any:
        return self.first.config

    @property
    def dtype(self) -> torch.dtype:
        return self.first.dtype

    @property
    def device(self) -> torch.device:
        return self.first.device

    def steps_for(self, timesteps: Sequence[float]) -> dict[str, list[int]]:
        """``{component: global steps it runs}`` in a run with ``timesteps`` (see :func:`split_steps`)."""
        return split_steps(self.component_names, self.boundary, timesteps)

    def component(self, name: str) -> torch.nn.Module:
        """The transformer of component ``name``."""
        return self.first if name == self.component_names[0] else self.planner_components[name]

    def train(self, mode: bool = True) -> "TransformerPair":
        super().train(mode)
        self.first.train(mode)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._inner is None:
            raise PlannerError("a TransformerPair is called through its transformers (the pipeline's), not directly")
        return self._inner(*args, **kwargs)

    def detach(self) -> None:
        """Take the routing hooks off the transformers."""
        for name in self.component_names:
            module = self.component(name)
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and registry.get_hook(ROUTE_HOOK) is not None:
                registry.remove_hook(ROUTE_HOOK, recurse=False)


def pair_of(pipe: Any, register: Callable[[torch.nn.Module, ModelHook, str], None] | None = None
            ) -> tuple[TransformerPair | None, bool]:
    """``(pair, made)``: the pair routing ``pipe``'s transformers (``None`` for a pipeline with one), and
    whether this call made it. A pair made before (by a Runner or another ``apply_plan``) is found through
    its routing hook. ``register(module, hook, name)`` attaches the routing hooks (default: diffusers'
    HookRegistry), so that a caller can take them off with its own hooks."""
    names = transformer_components(pipe)
    if len(names) < 2:
        return None, False
    first = getattr(pipe, names[0])
    registry = getattr(first, "_diffusers_hook", None)
    found = registry.get_hook(ROUTE_HOOK) if registry is not None else None
    if found is not None:
        return found.pair, False
    pair = TransformerPair(pipe, names)
    for name in names:
        hook = _RouteHook(pair, name)
        module = getattr(pipe, name)
        if register is not None:
            register(module, hook, ROUTE_HOOK)
        else:
            HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, ROUTE_HOOK)
    return pair, True
