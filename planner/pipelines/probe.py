"""A short probe run that measures how a pipeline's CFG branches reach its transformer.

Two runs of a few steps with one input each, differing only in the conditioning (another prompt, or
another class), with a hook on the transformer recording every call: its step (the timestep value
changes between steps), batch, diffusers cache-context name, and a digest of each batch half of its
conditioning arguments. The half (or the call) whose conditioning changes between the two runs is
the conditional branch. That gives the CFG layout: one call of batch 1 (``none``), one call of batch
2 with cond first or second (``cond_uncond`` / ``uncond_cond``), or two calls (``separate``, which the
executor takes as cond first unless cache contexts name the branches).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from diffusers.hooks import HookRegistry
from diffusers.hooks.hooks import BaseState, ModelHook, StateManager

from planner.cfg import CfgLayout, branch_of_context
from planner.errors import PlannerError

# Transformer arguments that carry the conditioning (text or class).
CONDITIONING_ARGS = ("encoder_hidden_states", "class_labels", "pooled_projections", "encoder_hidden_states_2")
HOOK = "dit-cache-planner.probe"


@dataclass
class _Call:
    timestep: float | None
    batch: int
    context: str | None
    halves: list[str] = field(default_factory=list)  # digest of the conditioning of each batch half


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class _Recorder(ModelHook):
    """Records each transformer call; stateful only so that ``cache_context(name)`` reaches it."""

    _is_stateful = True

    def __init__(self) -> None:
        super().__init__()
        self.state = StateManager(_NoState)
        self.calls: list[_Call] = []

    def pre_forward(self, module, *args, **kwargs):
        from planner.executor.tree import call_batch, get_arg

        t = get_arg(type(module), "timestep", args, kwargs)
        value = float(t.detach().reshape(-1).max()) if isinstance(t, torch.Tensor) and t.numel() else None
        batch = call_batch(type(module), args, kwargs)
        ctx = self.state._context
        conditioning = [get_arg(type(module), n, args, kwargs) for n in CONDITIONING_ARGS]
        tensors = [c for c in conditioning if isinstance(c, torch.Tensor) and c.dim() > 0 and c.shape[0] == batch]
        halves = [_digest([c[i:i + 1] for c in tensors]) for i in range(batch)] if batch <= 2 else []
        self.calls.append(_Call(value, batch, ctx.name if ctx is not None else None, halves))
        return args, kwargs

    def reset_state(self, module):
        return module


def _digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().to(torch.float64).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


@dataclass(frozen=True)
class ProbeResult:
    """What a probe measured: the layout, calls per step, batch per call, cache-context names seen."""

    layout: CfgLayout
    calls_per_step: int
    batch: int
    contexts: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"cfg_layout": self.layout.value, "calls_per_step": self.calls_per_step, "batch": self.batch,
                "contexts": list(self.contexts)}


def _record(runner, condition, sampler, seed: int) -> list[_Call]:
    transformer = runner.transformer
    had_registry, had_forward = hasattr(transformer, "_diffusers_hook"), "forward" in vars(transformer)
    recorder = _Recorder()
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(recorder, HOOK)
    try:
        runner.run([condition], [seed], sampler, output="latent")
    finally:
        registry.remove_hook(HOOK, recurse=False)
        if not registry.hooks:  # leave the model as it was: no registry, no instance forward
            if not had_registry:
                del transformer._diffusers_hook
            if not had_forward and "forward" in vars(transformer):
                del transformer.forward
    return recorder.calls


def _steps(calls: list[_Call]) -> list[list[_Call]]:
    """Calls grouped by step: a new step starts where the timestep value changes."""
    out: list[list[_Call]] = []
    for c in calls:
        if not out or c.timestep != out[-1][0].timestep:
            out.append([])
        out[-1].append(c)
    return out


def probe(runner, sampler, steps: int = 2) -> ProbeResult:
    """Measure the CFG layout of ``runner`` under ``sampler`` from two short runs (see the module docstring)."""
    short = replace(runner.resolve(sampler), steps=min(steps, runner.resolve(sampler).steps))
    a, b = runner.conditions(2, seed=0)
    if a == b:
        raise PlannerError("the probe needs two different conditions: give at least two prompts or class labels")
    first, second = _record(runner, a, short, 0), _record(runner, b, short, 0)
    per_step = _steps(first)
    counts = {len(s) for s in per_step}
    if len(counts) != 1 or len(first) != len(second):
        raise PlannerError(f"{runner.spec}: the transformer is called {sorted(counts)} times per step: the planner "
                           "needs the same number of calls at every step")
    calls, batch = counts.pop(), first[0].batch
    contexts = tuple(dict.fromkeys(c.context for c in first if c.context))
    if calls == 1 and batch == 1:
        layout = CfgLayout.NONE
    elif calls == 1 and batch == 2:
        changed = [i for i in range(2) if first[0].halves[i] != second[0].halves[i]]
        if changed not in ([0], [1]):
            raise PlannerError(f"{runner.spec}: cannot tell the conditional half of a batched CFG call (the "
                               "conditioning arguments the probe knows did not tell them apart)")
        layout = CfgLayout.COND_UNCOND if changed == [0] else CfgLayout.UNCOND_COND
    elif calls == 2 and batch == 1:
        layout = CfgLayout.SEPARATE
        names = [branch_of_context(c.context) for c in per_step[0]]
        cond_first = names[0] == "cond" if names[0] else first[0].halves != second[0].halves
        if not cond_first:
            raise PlannerError(f"{runner.spec}: its two calls per step come uncond first without naming their branches; "
                               "the executor takes the first call for cond")
    else:
        raise PlannerError(f"{runner.spec}: {calls} transformer call(s) of batch {batch} per step for one input: "
                           "no CFG layout the executor knows")
    return ProbeResult(layout, calls, batch, contexts)


def check_layout(runner, sampler) -> ProbeResult:
    """Probe ``runner`` and compare with what its family says; PlannerError naming both when they differ."""
    measured = probe(runner, sampler)
    claimed = runner.cfg_layout(sampler)
    if measured.layout is not claimed:
        raise PlannerError(f"{runner.spec}: its family expects CFG layout {claimed!r} at guidance "
                           f"{runner.resolve(sampler).guidance:g}, but a probe run measured {measured.layout!r}")
    return measured
